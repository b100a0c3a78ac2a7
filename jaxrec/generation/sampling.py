"""Samplers: small frozen dataclasses that turn one step's logits into tokens.

Every sampler maps logits [B, V] (and an optional allowed-token mask [B, V]) to the processed
log-probabilities of its sampling distribution, then draws one token per row. The log-prob it
reports for a token is under that same processed distribution (temperature applied, top-k /
top-p / disallowed tokens removed), which is what PPO's behaviour policy needs. Greedy decoding
is deterministic; it reports log-probs under the untempered distribution (temperature 1).

Drawing uses one uniform number per row against the cumulative probabilities (inverse CDF)
rather than Gumbel noise over the whole vocabulary: on CPU the per-vocabulary noise was about a
third of a decode step (MEASURED.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a row whose every token is masked still gives finite log-probs


def apply_allowed(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Remove disallowed tokens: logits [B, V] float32, allowed [B, V] bool or None."""
    if allowed is None:
        return logits
    return jnp.where(allowed, logits, NEG_INF)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of strictly better tokens
    keep = mass_before < p  # the first token is always kept
    # The smallest kept logit per row is the threshold.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def draw(key: jax.Array, logprobs: jax.Array, block: int = 64) -> jax.Array:
    """One token per row from log-probs [B, V] by inverse CDF: [B] int32.

    Two levels, so no cumulative sum runs over the whole vocabulary (XLA's CPU lowers cumsum
    to a reduce-window; this is ~4x faster at V=4096): find the block of `block` tokens that
    holds the uniform draw u, then the token inside it. Same token as a flat inverse CDF.
    """
    b, v = logprobs.shape
    n_blocks = -(-v // block)
    probs = jnp.pad(jnp.exp(logprobs), ((0, 0), (0, n_blocks * block - v)))
    blocks = probs.reshape(b, n_blocks, block)  # [B, NB, block]
    block_mass = blocks.sum(-1)  # [B, NB]
    block_cdf = jnp.cumsum(block_mass, axis=-1)  # [B, NB]
    u = jax.random.uniform(key, (b, 1), jnp.float32, minval=1e-12)
    u = u * block_cdf[:, -1:]  # rescale so the last bucket is reachable despite rounding
    bi = jnp.minimum(jnp.sum(block_cdf < u, axis=-1), n_blocks - 1)[:, None]  # [B, 1]
    mass_before = (jnp.take_along_axis(block_cdf, bi, -1) - jnp.take_along_axis(block_mass, bi, -1))
    inner = jnp.take_along_axis(blocks, bi[:, :, None], axis=1)[:, 0]  # [B, block]
    inner_cdf = mass_before + jnp.cumsum(inner, axis=-1)  # [B, block]
    j = jnp.minimum(jnp.sum(inner_cdf < u, axis=-1), block - 1)
    return jnp.minimum(bi[:, 0] * block + j, v - 1).astype(jnp.int32)


def _gather(logprobs: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding; reports log-probs at temperature 1."""

    def logprobs(self, logits, allowed=None):
        return jax.nn.log_softmax(apply_allowed(logits, allowed), axis=-1)

    def sample(self, key, logits, allowed=None):
        del key
        logprobs = self.logprobs(logits, allowed)
        tokens = jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
        return tokens, _gather(logprobs, tokens)

    @property
    def temperature(self) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sampling from softmax(logits / temperature)."""

    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use Greedy for 0)")

    def filter(self, logits):
        return logits

    def logprobs(self, logits, allowed=None):
        scaled = logits.astype(jnp.float32) / self.temperature
        return jax.nn.log_softmax(self.filter(apply_allowed(scaled, allowed)), axis=-1)

    def sample(self, key, logits, allowed=None):
        logprobs = self.logprobs(logits, allowed)
        tokens = draw(key, logprobs)
        return tokens, _gather(logprobs, tokens)


@dataclasses.dataclass(frozen=True)
class TopK(Temperature):
    """Sampling among the k most likely tokens, after temperature."""

    k: int = 50

    def __post_init__(self):
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"top_k={self.k} must be >= 1")

    def filter(self, logits):
        return top_k_filter(logits, self.k)


@dataclasses.dataclass(frozen=True)
class TopP(Temperature):
    """Nucleus sampling: the smallest set of tokens holding probability p, after temperature."""

    p: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"top_p={self.p} must be in (0, 1]")

    def filter(self, logits):
        return top_p_filter(logits, self.p)


@dataclasses.dataclass(frozen=True)
class TopKTopP(Temperature):
    """Top-k, then nucleus, after temperature (the order transformers applies them)."""

    k: int = 50
    p: float = 0.9

    def filter(self, logits):
        return top_p_filter(top_k_filter(logits, self.k), self.p)


Sampler = Greedy | Temperature | TopK | TopP | TopKTopP


def make_sampler(
    greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Sampler:
    """The sampler for command-line style settings (top_k 0 and top_p 1 mean off)."""
    if greedy:
        return Greedy()
    if top_k > 0 and top_p < 1.0:
        return TopKTopP(temperature=temperature, k=top_k, p=top_p)
    if top_k > 0:
        return TopK(temperature=temperature, k=top_k)
    if top_p < 1.0:
        return TopP(temperature=temperature, p=top_p)
    return Temperature(temperature=temperature)
