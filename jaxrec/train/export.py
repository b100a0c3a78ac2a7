"""`jaxrec export`: a run's policy as a Hugging Face folder that maps text back to items.

The folder holds what transformers needs (config.json, generation_config.json,
model.safetensors, the tokenizer) and two files of ours:

- `jaxrec_catalogue.json`: `{"items": [{"index", "title", "text", "tokens"}, ...]}`, where
  `tokens` is the item's token block exactly as the policy saw and generated it, and `text` its
  decoding;
- `jaxrec_template.json`: the prompt template. Prompt ids are
  `[bos] + enc(prefix) + join(items' tokens, enc(separator)) + enc(suffix)` with the most
  recent items whose tokens fit in `prompt_len`; a completion is `slate_size` item blocks, each
  followed by the slate separator token, the last by EOS.

`prompt_ids` and `parse_slate` below implement both directions with nothing but these files and
a tokenizer's `encode`, so recommendations can be produced and read wherever the folder goes.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxrec.checkpoint import Checkpointer
from jaxrec.config import load_config
from jaxrec.models import save_pretrained
from jaxrec.train.setup import Setup, build_setup

CATALOGUE = "jaxrec_catalogue.json"
TEMPLATE = "jaxrec_template.json"


def _latest_policy(workdir: pathlib.Path, config, setup: Setup, stage: str | None):
    """(stage, params) of the policy to export."""
    has = lambda s: (workdir / "checkpoints" / s).is_dir() and any(
        p.name.isdigit() for p in (workdir / "checkpoints" / s).iterdir())
    stage = stage or next((s for s in ("ppo", "sft") if has(s)), None)
    if stage is None or not has(stage):
        what = f"checkpoints/{stage}" if stage else "checkpoints/ppo or checkpoints/sft"
        raise FileNotFoundError(f"{workdir}: no trained policy ({what} is empty or missing)")
    if stage == "sft":
        from jaxrec.train.sft import load_sft_params

        return stage, load_sft_params(config, workdir)
    from jaxrec.train.loop import PPORun
    from jaxrec.train.stages import reward_model_for_ppo

    # the restore target has the run's shapes, the reward model included when PPO used one
    run = PPORun(config, setup.params, reward_model_for_ppo(config, workdir))
    state, users, key = run.initial()
    ckpt = Checkpointer(workdir / "checkpoints" / stage, asynchronous=False)
    try:
        state = ckpt.restore(None, state, users, key)[0]
    finally:
        ckpt.close()
    return stage, state.merged_policy()


def catalogue_entries(setup: Setup) -> list[dict]:
    """One entry per item: index, title, the token block and its decoding."""
    codec, tok = setup.codec, setup.tokenizer
    blocks = np.asarray(codec.item_tokens)
    lengths = np.asarray(codec.item_len)
    entries = []
    for i, (block, n) in enumerate(zip(blocks, lengths, strict=True)):
        ids = [int(t) for t in block[:n]]
        # item tokens are new to the tokenizer: their text is the title
        text = setup.titles[i] if codec.item_token_offset >= 0 else tok.decode(ids).strip()
        entries.append({"index": i, "title": setup.titles[i], "text": text, "tokens": ids})
    return entries


def export(workdir, out, *, stage: str | None = None, dtype: str = "float32") -> pathlib.Path:
    """Write the run's policy (default: the PPO stage's latest, else the SFT stage's) to `out`.

    Nothing is written unless everything is: the folder is assembled beside `out` and moved
    into place at the end. `out` must not exist or be an empty folder.
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out).absolute()
    if not (workdir / "config.yaml").is_file():
        raise FileNotFoundError(f"{workdir}/config.yaml is missing: not a jaxrec work dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder")
    config = load_config(workdir / "config.yaml")
    setup = build_setup(config)
    stage, params = _latest_policy(workdir, config, setup, stage)
    params = jax.tree.map(np.asarray, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = save_pretrained(setup.model, params, staging / "policy",
                                 tokenizer=setup.tokenizer, dtype=dtype)
        (folder / CATALOGUE).write_text(json.dumps({"items": catalogue_entries(setup)}))
        template = {**setup.template, "stage": stage, "pad_id": int(setup.codec.pad_id),
                    "prompt_len": setup.spec.prompt_len,
                    "slate_sep_id": int(setup.codec.slate_sep_id),
                    "data_source": config.data.source}
        (folder / TEMPLATE).write_text(json.dumps(template, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(folder, out)
    finally:
        for path in sorted(staging.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        staging.rmdir()
    return out


def load_export(folder) -> tuple[dict, list[dict]]:
    """(template, catalogue items) of an exported folder."""
    folder = pathlib.Path(folder)
    template = json.loads((folder / TEMPLATE).read_text())
    items = json.loads((folder / CATALOGUE).read_text())["items"]
    return template, items


def prompt_ids(encode: Callable[[str], list[int]], template: dict, items: list[dict],
               history: Sequence[int], bos_id: int | None = None) -> list[int]:
    """The prompt for a history of item indices (oldest first), as the policy was trained on.

    `encode` is the exported tokenizer's encode without special tokens; `bos_id` its BOS id
    (used when the template says so).
    """
    head = ([bos_id] if template["bos"] and bos_id is not None else [])
    head += encode(template["prefix"])
    sep, suffix = encode(template["separator"]), encode(template["suffix"])
    budget = template["prompt_len"] - len(head) - len(suffix) + len(sep)
    recent: list[list[int]] = []  # the most recent items whose blocks fit, newest first
    for i in reversed(list(history)):
        block = items[int(i)]["tokens"]
        budget -= len(block) + len(sep)
        if budget < 0:
            break
        recent.append(block)
    if not recent:
        raise ValueError(f"no item of the history fits in {template['prompt_len']} tokens")
    body = [t for n, block in enumerate(reversed(recent)) for t in (sep if n else []) + block]
    return head + body + suffix


def parse_slate(completion: Sequence[int], template: dict, items: list[dict]) -> list[int]:
    """Completion token ids -> item indices (-1 where a block names no item), cut at EOS."""
    by_tokens = {tuple(x["tokens"]): x["index"] for x in items}
    slate_sep_id = template["slate_sep_id"]
    slate, block = [], []
    for t in completion:
        if t in (slate_sep_id, template["eos_id"]):
            slate.append(by_tokens.get(tuple(block), -1))
            block = []
            if t == template["eos_id"]:
                break
        else:
            block.append(int(t))
    if block:
        slate.append(by_tokens.get(tuple(block), -1))
    return slate


def allowed_tokens_fn(template: dict, items: list[dict], prompt_len: int,
                      banned: Sequence[int] = ()) -> Callable:
    """Catalogue-constrained decoding for transformers' `generate(prefix_allowed_tokens_fn=)`.

    A policy trained with constrained decoding only ever learned to rank real items: left free,
    it may put mass on strings that name nothing. This walks the items' token blocks as a
    prefix tree, as our decoder does: inside a block only continuations of some item, after a
    complete block the slate separator (or EOS after the last slot), and never an item already
    in this slate or in `banned` (e.g. the history). `prompt_len` is the prompt's length in
    tokens (the function sees prompt + generated ids).
    """
    blocks = {x["index"]: tuple(x["tokens"]) for x in items if x["index"] not in set(banned)}
    k, sep, eos = template["slate_size"], template["slate_sep_id"], template["eos_id"]

    def allowed(batch_id: int, ids) -> list[int]:
        generated = [int(t) for t in ids[prompt_len:]]
        chosen, block = [], []
        for t in generated:
            if t in (sep, eos):
                chosen.append(tuple(block))
                block = []
            else:
                block.append(t)
        if generated and generated[-1] == eos:
            return [eos]  # finished: transformers pads after EOS itself
        prefix, n = tuple(block), len(block)
        nxt = {b[n] for b in blocks.values() if len(b) > n and b[:n] == prefix
               and b not in chosen}
        if prefix in blocks.values() and prefix not in chosen:
            nxt.add(eos if len(chosen) == k - 1 else sep)
        return sorted(nxt) or [eos]

    return allowed
