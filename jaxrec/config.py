"""Every setting as a frozen dataclass: the model (`ModelConfig`) and PPO (`PPOConfig`).

Rank 0 of the import order: this module imports nothing from jaxrec. Every field has a
one-line comment; invalid values raise a one-line error naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from typing import Any, Literal

Family = Literal["gpt2", "llama"]

FAMILIES = ("gpt2", "llama")
ROPE_STYLES = ("half", "interleaved")
DTYPES = ("float32", "bfloat16")
# `auto`: bfloat16 compute where the hardware multiplies bfloat16 natively, float32 elsewhere
# (jaxrec.hardware decides when a run starts).
COMPUTE_DTYPES = ("auto", *DTYPES)
ACTIVATIONS = ("gelu_new", "silu")
# Hugging Face architecture names we read and write, with the family each belongs to.
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only causal LM (GPT-2 or Llama family).

    Hashable, so it can be a static argument of `jax.jit`.
    """

    family: Family = "llama"  # 'gpt2': LayerNorm, learned positions; 'llama': RMSNorm, RoPE
    vocab_size: int = 512  # rows of the token embedding (and of the output head)
    d_model: int = 64  # width of the residual stream
    n_layers: int = 2  # decoder blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (< n_heads: grouped-query attention)
    head_dim: int = 0  # per-head width; 0 means d_model // n_heads
    d_ff: int = 256  # hidden width of the MLP (SwiGLU or GELU)
    max_len: int = 512  # longest sequence (GPT-2: rows of the position table)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    activation: str = "silu"  # 'silu' (SwiGLU, Llama) or 'gelu_new' (GPT-2)
    rope_theta: float = 10000.0  # RoPE base frequency (llama family)
    rope_style: str = "half"  # 'half': rotate-half (Hugging Face); 'interleaved': pairs (2i, 2i+1)
    qkv_bias: bool = False  # biases on q/k/v projections (GPT-2, Qwen2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    tie_embeddings: bool = True  # output head shares the token embedding
    dtype: str = "float32"  # compute dtype of matmuls; accumulation is always float32
    param_dtype: str = "float32"  # storage dtype of freshly initialised params
    cache_dtype: str = "float32"  # KV-cache dtype (float32 is faster on CPU; bf16 on accelerators)
    remat: bool = False  # rematerialise each decoder block in the backward pass
    bos_id: int = 1  # begin-of-sequence token (-1: none)
    eos_id: int = 2  # end-of-sequence token (-1: none)
    pad_id: int = 0  # padding token used in prompt buffers
    architecture: str = ""  # Hugging Face architecture this came from / exports to ('' = default)

    def __post_init__(self):
        def allowed(name, value, options):
            if value not in options:
                raise ValueError(f"model.{name}={value!r} is not allowed; choose one of {options}")

        allowed("family", self.family, FAMILIES)
        allowed("rope_style", self.rope_style, ROPE_STYLES)
        allowed("activation", self.activation, ACTIVATIONS)
        for name in ("dtype", "param_dtype", "cache_dtype"):
            allowed(name, getattr(self, name), DTYPES)
        if self.architecture:
            allowed("architecture", self.architecture, tuple(ARCHITECTURES))
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim"
            )
        if self.family == "llama" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hf_architecture(self) -> str:
        if self.architecture:
            return self.architecture
        return "GPT2LMHeadModel" if self.family == "gpt2" else "LlamaForCausalLM"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def gpt2_config(**overrides) -> ModelConfig:
    """GPT-2 family defaults (LayerNorm, learned positions, GELU, biases, tied head)."""
    base = dict(
        family="gpt2",
        activation="gelu_new",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
        architecture="GPT2LMHeadModel",
    )
    base.update(overrides)
    base.setdefault("n_kv_heads", base.get("n_heads", ModelConfig.n_heads))  # no GQA in GPT-2
    return ModelConfig(**base)


def llama_config(**overrides) -> ModelConfig:
    """Llama family defaults (RMSNorm, RoPE, SwiGLU, no biases)."""
    base = dict(family="llama", activation="silu", architecture="LlamaForCausalLM")
    base.update(overrides)
    return ModelConfig(**base)


LR_SCHEDULES = ("constant", "linear", "cosine")


def _check_choice(section: str, name: str, value, options):
    if value not in options:
        key = f"{section}.{name}" if section else name
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {options}")


def _within(value, allowed: str) -> bool:
    """value lies in `allowed`: '> 0', '>= 1', or an interval such as '[0, 1)'. NaN never
    does (every comparison with it is false)."""
    if allowed[0] in "[(":
        low, high = (float(x) for x in allowed[1:-1].split(","))
        above = low <= value if allowed[0] == "[" else low < value
        return above and (value <= high if allowed[-1] == "]" else value < high)
    op, bound = allowed.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _check_ranges(section: str, obj, rules) -> None:
    """Table-driven range checks: rules are (space-separated field names, allowed range);
    a None value of an optional field passes, floats must also be finite."""
    types_ = {f.name: str(f.type) for f in dataclasses.fields(obj)}
    for names, allowed in rules:
        for name in names.split():
            value = getattr(obj, name)
            if value is None and "None" in types_[name]:
                continue
            finite = not isinstance(value, float) or math.isfinite(value)
            if finite and _within(value, allowed):
                continue
            what = "a finite number " if not finite else ""
            where = f"in {allowed}" if allowed[0] in "[(" else allowed
            null = " (or null)" if "None" in types_[name] else ""
            raise ValueError(f"{section}.{name}={value!r} must be {what}{where}{null}")


OLD_LOGP_SOURCES = ("rescore", "sampler")
ITEM_REPRESENTATIONS = ("text", "tokens")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of the PPO update (`jaxrec.ppo_step`) and of reward shaping."""

    iterations: int = 100  # PPO iterations (rollout + update) a run performs
    epochs: int = 4  # passes over the rollout batch per update
    minibatches: int = 4  # minibatches per epoch (the batch size must divide evenly)
    grad_accum: int = 1  # minibatches whose gradients are accumulated per optimizer step
    clip_low: float = 0.2  # ratio clip below 1 (1 - clip_low)
    clip_high: float = 0.2  # ratio clip above 1 (1 + clip_high); > clip_low is "clip-higher"
    dual_clip: float | None = None  # cap on the loss for negative advantages (e.g. 3.0)
    value_clip: float | None = 0.2  # clip of the value update around the rollout values
    vf_coef: float = 0.5  # value-loss weight (shared trunk: in the joint loss)
    ent_coef: float = 0.0  # entropy bonus weight
    ptx_coef: float = 0.0  # PPO-ptx: weight alpha of the supervised NLL term
    policy_lr: float = 1e-5  # peak learning rate of the policy optimizer
    value_lr: float = 1e-5  # peak learning rate of the value optimizer
    lr_schedule: str = "constant"  # 'constant' | 'linear' | 'cosine' decay after warm-up
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    total_steps: int = 1000  # optimizer steps the decay schedules span
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    adam_b1: float = 0.9  # Adam beta1
    adam_b2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    max_grad_norm: float | None = 1.0  # global-norm gradient clipping (None: off)
    temperature: float = 1.0  # sampling temperature the log-probs are computed at
    old_logp: str = "rescore"  # behaviour log-probs: 'rescore' (a teacher-forced pass of the
    #                            policy) | 'sampler' (the decoder's own: one forward pass fewer
    #                            per iteration, equal up to the cached decode's rounding)
    invalid_penalty: float = -1.0  # score added when a slot of the slate names no valid item
    missing_eos_penalty: float = -1.0  # score added when the completion did not end with EOS
    normalize_scores: bool = False  # batch-normalise slate scores to mean 0, std 1
    score_clip: float | None = None  # clip slate scores to [-clip, clip] (after normalising)
    whiten_rewards: bool = False  # whiten the shaped per-token rewards (their mean kept)
    whiten_advantages: bool = True  # normalise advantages per minibatch (masked)
    shared_value: bool = False  # value head on the policy trunk instead of a separate network
    gamma: float = 1.0  # GAE discount per action token
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.05  # initial beta of the KL penalty to the reference
    kl_kind: str = "k1"  # per-token KL estimator: 'k1' | 'k2' | 'k3'
    kl_adaptive: bool = True  # Ziegler et al. adaptive controller (False: fixed beta)
    kl_target: float = 6.0  # adaptive controller's target KL per sequence
    kl_horizon: float = 10000.0  # adaptive controller's horizon (samples)
    action_window: int | None = None  # actions lie only in each row's last W tokens (single-
    #                                   turn): the LM head and softmax run there only
    shuffle_blocks: int = 1  # rows are shuffled within this many contiguous blocks (set to
    #                          the data-parallel degree to reproduce a sharded run on one device)
    data_axis: str | None = None  # mesh axis name when the step runs inside shard_map
    max_bad_iterations: int = 3  # stop after this many consecutive iterations whose every
    #                              update was skipped for a non-finite gradient

    def __post_init__(self):
        _check_ranges("ppo", self, (
            ("iterations epochs minibatches grad_accum total_steps shuffle_blocks action_window "
             "max_bad_iterations", ">= 1"),
            ("warmup_steps", ">= 0"),
            ("clip_low", "(0, 1)"),
            ("clip_high policy_lr value_lr temperature value_clip max_grad_norm kl_target "
             "kl_horizon score_clip", "> 0"),
            ("dual_clip", "> 1"),
            ("vf_coef ent_coef ptx_coef weight_decay adam_eps kl_coef", ">= 0"),
            ("adam_b1 adam_b2", "[0, 1)"),
            ("gamma lam", "[0, 1]"),
        ))
        _check_choice("ppo", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("ppo", "kl_kind", self.kl_kind, ("k1", "k2", "k3"))
        _check_choice("ppo", "old_logp", self.old_logp, OLD_LOGP_SOURCES)
        if self.minibatches % self.grad_accum:
            raise ValueError(
                f"ppo.grad_accum={self.grad_accum} must divide ppo.minibatches={self.minibatches}"
            )

    def replace(self, **changes) -> PPOConfig:
        return dataclasses.replace(self, **changes)


STAGES = ("sft", "reward", "ppo")
DATA_SOURCES = (
    "synthetic", "movielens-100k", "movielens-1m", "movielens-latest-small", "movielens-20m",
    "movielens-25m",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where interactions and items come from."""

    source: str = "synthetic"  # 'synthetic' (the embedded world) or a MovieLens release
    dir: str | None = None  # folder of raw files, e.g. one holding ml-100k/ (None: TFDS)
    tfds_dir: str | None = None  # tensorflow-datasets data_dir (prepared or to download into)
    lenient: bool = False  # skip malformed rows (and count them) instead of failing
    min_user_ratings: int = 0  # k-core filter: keep users with at least this many ratings and
    min_item_ratings: int = 0  # items with at least this many, repeated until stable (0: off)

    def __post_init__(self):
        _check_choice("data", "source", self.source, DATA_SOURCES)
        _check_ranges("data", self, (("min_user_ratings min_item_ratings", ">= 0"),))


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """The user simulator the policy is trained against."""

    preset: str = "synthetic"  # 'synthetic' | 'movielens' | 'recsim-ie'
    n_items: int = 200  # synthetic: catalogue size
    n_topics: int = 8  # synthetic: topics
    history_len: int = 8  # items of history each simulated user carries
    reward: str = "content"  # reward preset: 'content' | 'products' | 'ads'
    world_seed: int = 0  # seed of the synthetic catalogue (fixed across runs)
    future_items: int = 0  # movielens: sessions start at a random cut of a real training
    #                        history and the user's next this-many logged items attract clicks
    future_utility: float = 3.0  # movielens: the click utility those logged items gain
    diversity: float | None = None  # reward weight of the slate's topic diversity (None: preset's)
    novelty: float | None = None  # reward weight of the clicked item's novelty (None: preset's)

    def __post_init__(self):
        _check_choice("sim", "preset", self.preset, ("synthetic", "movielens", "recsim-ie"))
        _check_choice("sim", "reward", self.reward, ("content", "products", "ads"))
        _check_ranges("sim", self, (("n_items n_topics history_len", ">= 1"),
                                    ("future_items future_utility", ">= 0")))
        if self.future_items and self.preset != "movielens":
            raise ValueError(f"sim.future_items={self.future_items} needs sim.preset=movielens "
                             "(logged histories); the other worlds have none")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How recommendations are sampled during PPO."""

    users: int = 64  # simulated users per iteration (rows of the rollout batch)
    slate_size: int = 3  # items per recommendation
    history_items: int = 4  # most recent history items rendered into the prompt
    temperature: float = 1.0  # sampling temperature (0: greedy)
    constrained: bool = True  # decode only real, distinct catalogue items
    ban_history: bool = True  # never recommend an already consumed item
    turns: int = 1  # recommendation turns per session (the consumed item joins the history)

    def __post_init__(self):
        _check_ranges("rollout", self, (
            ("users slate_size history_items turns", ">= 1"),
            ("temperature", ">= 0"),
        ))


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The policy LM: a checkpoint to start from, or a fresh model of this shape."""

    init: str | None = None  # Hugging Face folder or llama2.c .bin; None: fresh weights
    family: str = "llama"  # fresh model: 'llama' | 'gpt2'
    d_model: int = 64  # fresh model: width
    n_layers: int = 2  # fresh model: decoder blocks
    n_heads: int = 4  # fresh model: query heads
    n_kv_heads: int = 2  # fresh model: key/value heads
    d_ff: int = 128  # fresh model: MLP width
    dtype: str = "auto"  # compute dtype: 'bfloat16' (bf16 matmuls, f32 accumulation), 'float32',
    #                      or 'auto' (bfloat16 only on AMX/AVX512_BF16 CPUs, Ampere+ GPUs, TPUs)
    cache_dtype: str = "auto"  # KV-cache dtype; 'auto': float32 on CPU, bfloat16 on accelerators
    remat: bool = False  # rematerialise blocks in the backward pass
    frozen_dtype: str = "float32"  # storage of frozen params (reference / LoRA base, reward
    #                                model): 'bfloat16' halves their memory
    items: str = "text"  # how items are written: 'text' (titles in the tokenizer's tokens) or
    #                      'tokens' (one new vocabulary token per item, started from its title)

    def __post_init__(self):
        _check_choice("model", "family", self.family, FAMILIES)
        _check_choice("model", "items", self.items, ITEM_REPRESENTATIONS)
        _check_choice("model", "dtype", self.dtype, COMPUTE_DTYPES)
        _check_choice("model", "cache_dtype", self.cache_dtype, COMPUTE_DTYPES)
        _check_choice("model", "frozen_dtype", self.frozen_dtype, DTYPES)
        _check_ranges("model", self, (("d_model n_layers n_heads n_kv_heads d_ff", ">= 1"),))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of "
                             f"model.n_kv_heads={self.n_kv_heads}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x on the target layers.

    With rank > 0 the PPO stage trains only adapters: the policy's base weights are frozen and
    are also the reference policy (no second copy), and the value network is a second set of
    adapters on the same base plus a value head. Export merges W + (alpha / rank) A B."""

    rank: int = 0  # adapter rank r (0: full fine-tuning, no adapters)
    alpha: float = 16.0  # scale numerator: the update is (alpha / rank) A B
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # adapted layers

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0: off)")
        _check_ranges("lora", self, (("alpha", "> 0"),))
        if not self.targets:
            raise ValueError(f"lora.targets is empty; choose from {', '.join(LORA_TARGETS)}")
        for target in self.targets:
            _check_choice("lora", "targets", target, LORA_TARGETS)
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets={list(self.targets)} names a layer twice")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The supervised stage: next-item prediction on histories rendered as text."""

    steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples per step
    lr: float = 1e-3  # peak learning rate (linear warmup, then constant)
    warmup_steps: int = 20  # linear warmup steps
    l2: float = 0.0  # lambda of the L2 regulariser lambda * ||theta||^2
    l2_mode: str = "decoupled"  # 'loss': added to the loss | 'decoupled': AdamW weight decay
    max_grad_norm: float = 1.0  # global-norm gradient clipping
    eval_every: int = 50  # held-out loss and next-item accuracy every N steps (and at the end)
    eval_users: int = 256  # held-out users (never trained on)
    examples_per_user: int = 4  # training examples cut from each user's history (item
    #                             tokens: windows of rollout.history_items + 1 items)
    item_dropout: float = 0.0  # item tokens: chance that a history item is hidden from
    #                            attention in a training sequence (a regulariser)

    def __post_init__(self):
        _check_choice("sft", "l2_mode", self.l2_mode, ("loss", "decoupled"))
        _check_ranges("sft", self, (("item_dropout", "[0, 1)"),))
        _check_ranges("sft", self, (
            ("steps batch_size eval_every eval_users examples_per_user", ">= 1"),
            ("warmup_steps l2", ">= 0"),
            ("lr max_grad_norm", "> 0"),
        ))


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward-model stage (Bradley-Terry on preference pairs) and how PPO uses it."""

    steps: int = 300  # optimizer steps
    batch_size: int = 32  # preference pairs per step
    lr: float = 3e-4  # peak learning rate (linear warmup, then constant)
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    pairs: str = "auto"  # 'ratings' (MovieLens), 'simulator' (simulated comparisons), 'auto'
    eval_every: int = 50  # held-out pairwise accuracy every N steps (and at the end)
    eval_pairs: int = 512  # held-out pairs (users never trained on)
    normalize_samples: int = 256  # policy samples whose scores set the mean 0 / std 1
    ppo_source: str = "simulator"  # PPO's reward: 'simulator' | 'model' | 'mix'
    mix: float = 0.5  # 'mix': weight of the model's normalised score (1 - mix: simulator's)

    def __post_init__(self):
        _check_choice("reward", "pairs", self.pairs, ("auto", "ratings", "simulator"))
        _check_choice("reward", "ppo_source", self.ppo_source, ("simulator", "model", "mix"))
        _check_ranges("reward", self, (
            ("steps batch_size eval_every eval_pairs normalize_samples", ">= 1"),
            ("warmup_steps weight_decay", ">= 0"),
            ("lr", "> 0"),
            ("mix", "[0, 1]"),
        ))


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """What the PPO stage shows and evaluates while it runs."""

    sample_every: int = 10  # log greedy recommendations for fixed users every N iterations (0: off)
    sample_users: int = 3  # users shown in those samples and in the end summary
    eval_every: int = 10  # held-out evaluation every N iterations (0: off); the best is kept
    eval_users: int = 128  # held-out simulated users (their own draw, never trained on)

    def __post_init__(self):
        for name in ("sample_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"monitor.{name}={getattr(self, name)} must be >= 0")
        for name in ("sample_users", "eval_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"monitor.{name}={getattr(self, name)} must be >= 1")


EVAL_POLICIES = ("sft", "ppo", "ppo_best")
BASELINES = ("popularity", "bpr", "sasrec")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`jaxrec eval`: offline ranking (MovieLens, leave-one-out) and simulator evaluation."""

    policies: tuple[str, ...] = ("sft", "ppo")  # trained stages to evaluate (when present)
    baselines: tuple[str, ...] = ()  # 'popularity' | 'bpr' | 'sasrec' (--baselines overrides)
    seeds: int = 3  # training seeds per baseline (mean and 95% interval over them)
    baseline_epochs: int | None = None  # most epochs of BPR and SASRec (None: their own
    #                                     defaults; both stop early on validation HR@10)
    sasrec_dropout: float = 0.2  # SASRec's dropout (0.4 on small data: ml-latest-small)
    candidates: int = 20  # candidate protocol: the held-out item plus this many - 1 negatives
    users: int | None = None  # offline users evaluated (the first N; None: all)
    sim_users: int = 256  # simulated users (first episodes) per decoding
    temperature: float = 1.0  # the sampled decoding's temperature (greedy is the other)
    validity_users: int = 256  # users whose free and constrained generations are checked

    def __post_init__(self):
        for p in self.policies:
            _check_choice("eval", "policies", p, EVAL_POLICIES)
        for b in self.baselines:
            _check_choice("eval", "baselines", b, BASELINES)
        _check_ranges("eval", self, (
            ("seeds sim_users validity_users users baseline_epochs", ">= 1"),
            ("candidates", ">= 2"),
            ("temperature", "> 0"),
            ("sasrec_dropout", "[0, 1)"),
        ))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 10  # save every N iterations (and at the end)
    keep: int = 3  # checkpoints kept per stage

    def __post_init__(self):
        for name in ("every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"checkpoint.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one of them may be -1 (all remaining devices)."""

    shard: bool = False  # run the PPO iteration on this mesh (False: one device)
    data: int = -1  # data parallel: the batch is split, params replicated
    fsdp: int = 1  # params and optimizer state split along the embedding dimension
    tensor: int = 1  # heads, MLP columns and the vocabulary split

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("data", "fsdp", "tensor")}
        for name, size in sizes.items():
            if size != -1 and size < 1:
                raise ValueError(f"mesh.{name}={size} must be >= 1 or -1 (all remaining devices)")
        rest = [f"mesh.{name}" for name, size in sizes.items() if size == -1]
        if len(rest) > 1:
            raise ValueError(f"{', '.join(rest)} are -1; at most one mesh size may be -1")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. YAML in (`load_config`), `a.b=c` overrides, strict validation."""

    seed: int = 0  # one seed for everything stochastic in the run
    stages: tuple[str, ...] = ("ppo",)  # stages to run, in order: 'sft', 'reward', 'ppo'
    data: DataConfig = DataConfig()
    sim: SimConfig = SimConfig()
    model: PolicyConfig = PolicyConfig()
    lora: LoRAConfig = LoRAConfig()
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOConfig = PPOConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    monitor: MonitorConfig = MonitorConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        if not self.stages:
            raise ValueError(f"stages is empty; list one or more of {STAGES}")
        for stage in self.stages:
            _check_choice("", "stages", stage, STAGES)
        if self.sft.item_dropout and self.model.items != "tokens":
            raise ValueError(f"sft.item_dropout={self.sft.item_dropout} needs model.items=tokens "
                             "(it hides item tokens of training sequences)")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages={list(self.stages)} names a stage twice; each runs once, "
                             f"in the order given")

    def to_dict(self) -> dict:
        return _to_plain(self)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _convert(key: str, hint, value):
    """value (from YAML) -> the field's type, or a one-line error naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, arg, value)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{key} must be a mapping of its settings, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise TypeError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(key, item, v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {prefix}{key!s}; allowed: {', '.join(names)}")
        kwargs[key] = _convert(prefix + key, hints[key], value)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


class DuplicateKeyError(ValueError):
    """A YAML mapping names the same key twice (`line` is 1-based, of the second one)."""

    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


def _safe_load(text: str):
    """`yaml.safe_load`, except that a key repeated in one mapping (at any depth) raises
    DuplicateKeyError instead of silently replacing the earlier value."""
    import yaml

    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<' merges may be overridden by the mapping's own keys
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise DuplicateKeyError(key, line, seen[key])
                        seen[key] = line
                    except TypeError:
                        continue  # an unhashable key: the base class reports it
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeySafeLoader)  # a SafeLoader: plain data only


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """A Config from a plain mapping plus `a.b=c` overrides (values parsed as YAML scalars)."""
    import yaml

    tree = dict(values or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. ppo.iterations=10")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. ppo.iterations=10")
        try:
            value = _safe_load(raw)
        except DuplicateKeyError as err:
            raise ValueError(f"--set {item}: duplicate key {err.key!r}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item}: not valid YAML ({err.__class__.__name__})") from None
        _set(tree, key.strip(), value)
    return _build(Config, tree)


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML with `yaml.safe_load`, apply overrides, validate. Errors name the file."""
    import yaml

    values: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            values = _safe_load(path.read_text()) or {}
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except DuplicateKeyError as err:
            raise ValueError(f"{path} {err}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{where}: not valid YAML ({err.__class__.__name__})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a mapping of settings")
    try:
        return config_from_dict(values, overrides)
    except (TypeError, ValueError) as err:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{err}") from None


def dump_config(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
