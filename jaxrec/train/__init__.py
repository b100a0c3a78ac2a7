"""Train state, the pure PPO step, meshes and shardings."""

from jaxrec.train.iteration import ScoreSpec, build_iteration
from jaxrec.train.loop import make_iteration, run_ppo
from jaxrec.train.state import TrainState, create_train_state, learning_rate, make_optimizer
from jaxrec.train.step import PPOBatch, ppo_step

__all__ = [
    "PPOBatch",
    "ScoreSpec",
    "TrainState",
    "build_iteration",
    "create_train_state",
    "learning_rate",
    "make_iteration",
    "make_optimizer",
    "ppo_step",
    "run_ppo",
]
