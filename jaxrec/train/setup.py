"""What every stage of a run builds first: the world, the tokenizer, the codec, the policy.

`build_setup(config)` gives the simulator (and its params), the catalogue's titles, the
tokenizer (the checkpoint's, or a byte-level BPE trained on the titles), the item codec, the
rollout shapes, and the policy's ModelConfig with its starting params. The SFT, reward and PPO
stages share it, so their prompts, item texts and token ids agree.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from jaxrec.codec import ItemCodec, add_item_tokens, build_codec, item_token_codec
from jaxrec.config import Config, ModelConfig
from jaxrec.data import load_tokenizer, train_bpe_tokenizer
from jaxrec.hardware import resolve_cache_dtype, resolve_dtype
from jaxrec.models import gpt2_config, init_params, llama_config, load_pretrained
from jaxrec.rollout import RolloutSpec
from jaxrec.sim import Environment, make_env


def build_world(config: Config):
    """(env, env_params, titles, years) for the configured simulator."""
    sim, data = config.sim, config.data
    if sim.preset == "movielens":
        if data.source == "synthetic":
            raise ValueError("sim.preset='movielens' needs data.source='movielens-...' (and "
                             "data.dir for raw files or data.tfds_dir for tensorflow-datasets)")
        return _movielens_world(config)
    if sim.preset != "synthetic" or data.source != "synthetic":
        raise ValueError(
            f"sim.preset={sim.preset!r} with data.source={data.source!r}: the PPO stage runs "
            "'synthetic' with 'synthetic', or 'movielens' with a MovieLens source"
        )
    env, params = make_env(
        "synthetic", n_items=config.sim.n_items, n_topics=config.sim.n_topics,
        slate_size=config.rollout.slate_size, history_len=config.sim.history_len,
        reward=config.sim.reward, seed=config.sim.world_seed,
        reward_weights=reward_weights(config),
    )
    return env, params, list(env.titles), None


def reward_weights(config: Config) -> dict:
    """The reward preset's weights that the config changes (sim.diversity, sim.novelty)."""
    return {name: getattr(config.sim, name) for name in ("diversity", "novelty")
            if getattr(config.sim, name) is not None}


def load_ratings(config: Config):
    """The configured MovieLens release as a `Ratings` table, k-core filtered when
    `data.min_user_ratings` / `data.min_item_ratings` ask for it. Every stage and `jaxrec eval`
    read their ratings here, so they index the same users and items."""
    from jaxrec.data import k_core, load_movielens

    data = config.data
    ratings = load_movielens(data.source, data_dir=data.dir, tfds_dir=data.tfds_dir,
                             lenient=data.lenient)
    return k_core(ratings, data.min_user_ratings, data.min_item_ratings)


def _movielens_world(config: Config):
    """Users calibrated to the chronological training split of a MovieLens release."""
    from jaxrec.data import leave_one_out

    ratings = load_ratings(config)
    train = leave_one_out(ratings).train
    items = ratings.items
    env, params = make_env(
        "movielens", users=ratings.user[train], items=ratings.item[train],
        ratings=ratings.rating[train], timestamps=ratings.timestamp[train],
        n_users=len(ratings.user_ids), n_items=len(items.ids), genres=items.genres,
        titles=[str(t) for t in items.clean_title], slate_size=config.rollout.slate_size,
        history_len=config.sim.history_len, reward=config.sim.reward,
        seed=config.sim.world_seed, future_items=config.sim.future_items,
        future_utility=config.sim.future_utility, reward_weights=reward_weights(config),
    )
    years = [int(y) if y > 0 else None for y in items.year]
    return env, params, [str(t) for t in items.clean_title], years


def build_tokenizer(config: Config, titles: list[str]):
    """The policy checkpoint's tokenizer, or a byte-level BPE trained on the titles."""
    init = config.model.init
    if init is None:  # a small byte-level BPE of the catalogue's own titles
        return train_bpe_tokenizer(titles, vocab_size=min(max(320, 256 + 3 + len(titles)), 4096))
    path = pathlib.Path(init)
    if path.is_dir():
        return load_tokenizer(path)
    for candidate in [path.parent / "tokenizer.bin", *sorted(path.parent.glob("tok*.bin"))]:
        if candidate.is_file() and candidate != path:
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"model.init={init}: no tokenizer beside it")


def build_policy(config: Config, tokenizer, max_len: int):
    """(ModelConfig, params): the checkpoint, or a fresh model sized to the tokenizer. A dtype
    of 'auto' becomes the one this machine computes fastest (jaxrec.hardware)."""
    m = config.model
    numerics = dict(dtype=resolve_dtype(m.dtype), cache_dtype=resolve_cache_dtype(m.cache_dtype),
                    remat=m.remat)
    if m.init is not None:
        cfg, params = load_pretrained(m.init)
        if cfg.max_len < max_len:
            raise ValueError(f"model.init={m.init} holds {cfg.max_len} positions; rollouts need "
                             f"{max_len} (turns x (prompt + completion))")
        return cfg.replace(**numerics), jax.tree.map(np.asarray, params)
    make = gpt2_config if m.family == "gpt2" else llama_config
    shape = dict(vocab_size=tokenizer.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                 n_heads=m.n_heads, d_ff=m.d_ff, max_len=max_len, **numerics,
                 bos_id=max(tokenizer.bos_id, -1),
                 eos_id=tokenizer.eos_id, pad_id=max(tokenizer.pad_id, 0))
    if m.family == "llama":
        shape["n_kv_heads"] = m.n_kv_heads
    cfg = make(**shape)
    return cfg, init_params(cfg, jax.random.key(config.seed))


# The prompt template (build_codec's defaults), recorded for export.
TEMPLATE = {"prefix": "Watched:", "separator": ";", "suffix": ". Next:"}


def _codec(titles, tokenizer, years, item_prefix):
    """(codec, slate separator): the first separator this tokenizer encodes as one token."""
    error = None
    for separator in (";", "\n", ",", "|", "and"):  # " and": SentencePiece vocabularies
        try:
            codec = build_codec(titles, tokenizer, years=years, item_prefix=item_prefix,
                                slate_separator=separator, **TEMPLATE)
            return codec, separator
        except ValueError as err:  # e.g. a SentencePiece prefix space makes ";" two tokens
            error = err
    raise ValueError(f"no slate separator fits this tokenizer: {error}")


@dataclasses.dataclass
class Setup:
    config: Config
    env: Environment
    env_params: Any
    titles: list[str]  # catalogue titles, by item index
    years: list[int | None] | None
    tokenizer: Any
    codec: ItemCodec
    spec: RolloutSpec  # prompt and completion shapes of a turn
    model: ModelConfig  # the policy's architecture (dtype etc. from config.model)
    params: Any  # the policy's starting params (checkpoint or fresh)
    template: dict  # prompt prefix / separator / suffix, item prefix, slate separator, BOS


def build_setup(config: Config) -> Setup:
    env, env_params, titles, years = build_world(config)
    tokenizer = build_tokenizer(config, titles)
    item_prefix = "" if type(tokenizer).__name__ == "Llama2cTokenizer" else " "
    codec, slate_separator = _codec(titles, tokenizer, years, item_prefix)
    template = {**TEMPLATE, "item_prefix": item_prefix, "slate_separator": slate_separator,
                "bos": bool(tokenizer.bos_id >= 0), "eos_id": codec.eos_id,
                "history_items": config.rollout.history_items,
                "slate_size": config.rollout.slate_size}
    tokens = config.model.items == "tokens"
    text_codec = codec
    if tokens:  # the lengths below do not depend on the offset, fixed once the model is built
        codec = item_token_codec(text_codec, tokenizer.vocab_size, sequence_template=True)
    template["items"] = config.model.items
    r = config.rollout
    spec = RolloutSpec(
        slate_size=r.slate_size, prompt_len=codec.prompt_len(r.history_items),
        max_new_tokens=codec.slate_len(r.slate_size), temperature=r.temperature,
        constrained=r.constrained, ban_history=r.ban_history, turns=r.turns,
    )
    model, params = build_policy(config, tokenizer, spec.session_len)
    if tokens:
        model, params, offset = add_item_tokens(model, params, text_codec)
        codec = item_token_codec(text_codec, offset, sequence_template=True)
        # the sequence template: every item followed by the slate separator (export reads it)
        template.update(item_token_offset=offset, separator=slate_separator,
                        suffix=slate_separator)
    return Setup(config=config, env=env, env_params=env_params, titles=titles, years=years,
                 tokenizer=tokenizer, codec=codec, spec=spec, model=model, params=params,
                 template=template)
