"""Train state, the pure PPO step, meshes and shardings."""

from jaxrec.train.state import TrainState, create_train_state, learning_rate, make_optimizer
from jaxrec.train.step import PPOBatch, ppo_step

__all__ = [
    "PPOBatch",
    "TrainState",
    "create_train_state",
    "learning_rate",
    "make_optimizer",
    "ppo_step",
]
