"""`jaxrec bench memory`: bytes per device of an RLHF-PPO run's state, per model, mesh and LoRA.

Nothing is allocated and no device is needed: the train state is built under `jax.eval_shape`
by the repository's own code (`init_params`, `create_train_state`, `init_value_params`,
`with_reward_model`), its PartitionSpecs come from `jaxrec.train.mesh.state_specs` (the
logical-axis rules a sharded run uses), and the bytes a device holds are computed from them:

    bytes of a leaf on one device = itemsize * prod(ceil(dim / size of the mesh axes on dim))

A dim that does not divide is counted at its ceiling (the padded shard the largest device holds)
and reported in the row's `notes`.

Counted (per device; GiB = 2**30 bytes):
- policy: full fine-tuning, the policy's params (float32). LoRA, the ONE frozen base (stored in
  `frozen_dtype`) plus the policy's adapters (float32): the base is also the reference, so it
  is counted here once and `reference` is 0.
- value: full fine-tuning, a separate value network (the backbone without an untied lm_head,
  plus a value head [d_model] and bias, float32). LoRA, a second adapter set on the shared base
  plus the value head (float32).
- reference: the frozen copy of the policy in `frozen_dtype` (0 under LoRA).
- reward: the frozen reward model (backbone + value head, as `init_value_params` builds it) in
  `frozen_dtype`, with its two float32 normalisation scalars.
- optimizer: the optax state of both optimizers (global-norm clipping + AdamW: mu and nu, two
  float32 copies of each trainable, sharded like it, plus step counters), the train state's
  step counter and the KL controller's scalars. `PPOConfig()` defaults: grad_accum = 1 (with
  grad_accum > 1, optax.MultiSteps would hold one more float32 copy of the trainables).
- gradients: one copy of the gradients of all trainables (policy and value), in their dtype
  (float32), sharded like the params (an assumption: they are intermediates of the jitted
  step, which XLA's sharding propagation normally lays out like the params).
- total: the sum of the above.

Models (fresh-weight shapes, `max_len` only matters for GPT-2's position table): GPT-2 small
(124.4M; tied head), Llama-3.2-1B (1.24B; GQA 32/8 heads, tied head), Llama-2-7B (6.74B;
untied head). Params are float32 (`param_dtype`), as a run initialises and trains them.

Not counted: activations (and their rematerialisation), the KV cache and sampling buffers of
the rollout, logits, the rollout batch, XLA temporaries and fusion buffers, the all-gathered
copies of sharded params that fsdp materialises layer by layer, framework/runtime reserves.
`FIT_FRACTION` (70%) of a device's memory is the budget for the counted state: the other ~30%
is left for what is not counted. A row "fits" a device type when its total is within that
budget ('yes'), within the whole memory ('tight'), or over it ('no').

Meshes: one device; data=8 (only replicates); fsdp=8; tensor=8; data=2 x fsdp=4; fsdp=4 x
tensor=2; plus the mesh recommended for each device type: v5e-8 (8 chips x 16 GiB), v4-32
(16 chips x 32 GiB), 8 x H100 (80 GiB). The recommendation is, among every (data, fsdp, tensor)
factorisation of the chip count, the first whose total fits the 70% budget in the order: least
tensor parallelism (tensor does not split the batch; data and fsdp both do), then most pure
data parallelism (fewest param all-gathers); when none fits, the mesh with the fewest bytes.

Output: one JSON line per (model, full | LoRA, mesh) row (GiB fields rounded, exact `bytes`,
`fits`, `notes`, `recommended_for`), then one {"recommendation": ...} line per (model,
full | LoRA, device type); `--markdown` prints both as tables instead.

Defaults: full fine-tuning keeps frozen params in float32 (the repository's default
`model.frozen_dtype`), LoRA rows in bfloat16; `--frozen-dtype` sets both. A separate value
network (`shared_value=False`, the default). A mesh with only 'data' > 1 replicates everything:
its bytes per device equal one device's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrec.config import LORA_TARGETS, LoRAConfig, ModelConfig, PPOConfig
from jaxrec.models import count_params, gpt2_config, init_params, init_value_params, llama_config
from jaxrec.models import lora as lora_lib

GIB = 2**30
FIT_FRACTION = 0.7  # ~30% of device memory left for activations, KV cache, XLA temporaries


@dataclass(frozen=True)
class ModelSpec:
    key: str  # --models name
    name: str  # printed name
    config: Callable[[], ModelConfig]


MODELS = (
    ModelSpec("125m", "GPT-2 small (125M)", lambda: gpt2_config(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024,
        bos_id=50256, eos_id=50256, pad_id=50256)),
    ModelSpec("1b", "Llama-3.2-1B", lambda: llama_config(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        tie_embeddings=True, max_len=131072, rope_theta=500000.0, bos_id=128000,
        eos_id=128001, pad_id=0)),
    ModelSpec("7b", "Llama-2-7B", lambda: llama_config(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
        tie_embeddings=False, max_len=4096, bos_id=1, eos_id=2, pad_id=0)),
)

# (label, data, fsdp, tensor)
MESHES = (
    ("1 device", 1, 1, 1),
    ("data=8", 8, 1, 1),
    ("fsdp=8", 1, 8, 1),
    ("tensor=8", 1, 1, 8),
    ("data=2 x fsdp=4", 2, 4, 1),
    ("fsdp=4 x tensor=2", 1, 4, 2),
)


@dataclass(frozen=True)
class DeviceType:
    name: str
    chips: int
    gib: float


DEVICES = (
    DeviceType("v5e-8", 8, 16.0),  # 8 TPU v5e chips x 16 GiB HBM
    DeviceType("v4-32", 16, 32.0),  # a v4-32 slice: 16 chips x 32 GiB HBM
    DeviceType("8xH100", 8, 80.0),  # 8 H100 GPUs x 80 GiB
)

CATEGORIES = ("policy", "value", "reference", "reward", "optimizer", "gradients")


def mesh_label(data: int, fsdp: int, tensor: int) -> str:
    parts = [f"{n}={s}" for n, s in (("data", data), ("fsdp", fsdp), ("tensor", tensor)) if s > 1]
    return " x ".join(parts) or "1 device"


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def leaf_bytes(shape: Sequence[int], itemsize: int, spec: P, mesh: dict[str, int],
               notes: set | None = None, where: str = "") -> int:
    """Bytes of one leaf on one device: itemsize * prod(ceil(dim / mesh size of its axes)).
    A dim that does not divide adds a line to `notes` (counted at the ceiling)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    n = itemsize
    for dim, entry in zip(shape, entries, strict=True):
        axes = _axes(entry)
        split = math.prod(mesh[a] for a in axes)
        if dim % split and notes is not None:
            over = " x ".join(f"{a}={mesh[a]}" for a in axes)
            notes.add(f"{where}: {dim} over {over} does not divide "
                      f"(counted as {-(-dim // split)} per device)")
        n *= -(-dim // split)
    return n


def _flat(tree, specs):
    """[(path, leaf, spec)] of a (possibly abstract) tree and its matching spec tree."""
    spec_leaves = jax.tree_util.tree_structure(tree).flatten_up_to(specs)
    return [(path, leaf, spec) for (path, leaf), spec in
            zip(jax.tree_util.tree_leaves_with_path(tree), spec_leaves, strict=True)]


def tree_bytes(tree, specs, mesh: dict[str, int], notes: set | None = None) -> int:
    """Sum of `leaf_bytes` over a (possibly abstract) tree and its matching spec tree."""
    return sum(leaf_bytes(leaf.shape, jnp.dtype(leaf.dtype).itemsize, spec, mesh, notes,
                          _generic_path(path)) for path, leaf, spec in _flat(tree, specs))


_WRAPPERS = ("mu", "nu", "params")  # optimizer-state and RewardModel fields around param paths


def _generic_path(path) -> str:
    """A leaf's param path with block numbers folded ("block_*.attn.q.kernel") and optimizer /
    reward-model wrappers dropped: one note per kind of leaf."""
    names = []
    for entry in path:
        name = str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
        if name.isdigit() or name in _WRAPPERS:
            continue
        names.append("block_*" if name.startswith("block_") else name)
    return ".".join(names) or "leaf"


def abstract_states(cfg: ModelConfig, loras: Sequence[LoRAConfig | None],
                    frozen_dtypes: Sequence[str]):
    """One PPO TrainState per (lora, frozen dtype), each with the reward model in
    frozen['reward'], as ShapeDtypeStructs: built by the code a run uses (`create_train_state`,
    `init_value_params`, `with_reward_model`) in one `jax.eval_shape`; nothing is allocated."""
    from jaxrec.train.reward_model import RewardModel, with_reward_model
    from jaxrec.train.state import create_train_state

    def build(key):
        params = init_params(cfg, key)
        rm = RewardModel(params=init_value_params(params), mean=jnp.zeros((), jnp.float32),
                         std=jnp.ones((), jnp.float32), model=cfg)
        states = []
        for lora, frozen_dtype in zip(loras, frozen_dtypes, strict=True):
            state = create_train_state(cfg, PPOConfig(), params, adapters=lora, key=key,
                                       frozen_dtype=frozen_dtype)
            states.append(with_reward_model(state, rm, frozen_dtype))
        return params, states

    return jax.eval_shape(build, jax.random.key(0))


@dataclass
class Layout:
    """One (model, LoRA, frozen dtype) train state and its specs; rows are mesh arithmetic over
    its leaves, grouped as {(category, kind, shape, itemsize, spec): count}."""

    spec: ModelSpec
    cfg: ModelConfig
    lora: LoRAConfig | None
    frozen_dtype: str
    params: int
    trainable_params: int
    adapter_params: int
    entries: dict

    def category_bytes(self, mesh: dict[str, int], notes: set | None = None) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for (category, where, shape, itemsize, spec), count in self.entries.items():
            out[category] += count * leaf_bytes(shape, itemsize, P(*spec), mesh, notes, where)
        return out


def _entries(state, specs, lora: bool) -> dict:
    """Group the state's leaves by category (see the module docstring)."""
    st, sp = state, specs
    parts = [
        ("policy", st.policy, sp.policy),
        ("value", st.value, sp.value),
        ("reward", st.frozen["reward"], sp.frozen["reward"]),
        ("optimizer", st.policy_opt, sp.policy_opt),
        ("optimizer", st.value_opt, sp.value_opt),
        ("optimizer", st.step, sp.step),
        ("optimizer", st.kl, sp.kl),
        ("gradients", st.policy, sp.policy),  # one copy of each trainable, same dtype/sharding
        ("gradients", st.value, sp.value),
    ]
    if lora:  # the one frozen base: the policy's base and the reference
        parts.append(("policy", st.frozen["base"], sp.frozen["base"]))
    else:
        parts.append(("reference", st.frozen["ref"], sp.frozen["ref"]))
    entries: dict = {}
    for category, tree, specs_tree in parts:
        for path, leaf, spec in _flat(tree, specs_tree):
            key = (category, _generic_path(path), tuple(leaf.shape),
                   jnp.dtype(leaf.dtype).itemsize, tuple(spec))
            entries[key] = entries.get(key, 0) + 1
    return entries


def build_layouts(spec: ModelSpec, ranks: Sequence[int] = (0,),
                  targets: Iterable[str] = LORA_TARGETS,
                  frozen_dtype: str | None = None) -> list[Layout]:
    """Layouts of one model, one per LoRA rank (0: full fine-tuning), from one trace."""
    from jaxrec.train.mesh import state_specs

    cfg = spec.config()
    loras = [LoRAConfig(rank=r, targets=tuple(targets)) if r > 0 else None for r in ranks]
    dtypes = [frozen_dtype or ("bfloat16" if lora else "float32") for lora in loras]
    params, states = abstract_states(cfg, loras, dtypes)
    layouts = []
    for lora, dtype, state in zip(loras, dtypes, states, strict=True):
        adapters = (lora_lib.count_adapter_params(state.policy)
                    + lora_lib.count_adapter_params(state.value)) if lora else 0
        layouts.append(Layout(
            spec, cfg, lora, dtype, count_params(params),
            count_params(state.policy) + count_params(state.value), adapters,
            _entries(state, state_specs(state), lora is not None)))
    return layouts


def build_layout(spec: ModelSpec, rank: int = 0, targets: Iterable[str] = LORA_TARGETS,
                 frozen_dtype: str | None = None) -> Layout:
    return build_layouts(spec, (rank,), targets, frozen_dtype)[0]


def fit(total_bytes: int, device: DeviceType) -> str:
    if total_bytes <= FIT_FRACTION * device.gib * GIB:
        return "yes"
    return "tight" if total_bytes <= device.gib * GIB else "no"


def row(layout: Layout, data: int, fsdp: int, tensor: int) -> dict:
    mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
    notes: set = set()
    cats = layout.category_bytes(mesh, notes)
    total = sum(cats.values())
    out = {
        "model": layout.spec.name,
        "params": layout.params,
        "mesh": mesh,
        "devices": data * fsdp * tensor,
        "lora": layout.lora.rank if layout.lora else 0,
        "frozen_dtype": layout.frozen_dtype,
        **{k: round(v / GIB, 4) for k, v in cats.items()},
        "total": round(total / GIB, 4),
        "fits": {d.name: fit(total, d) for d in DEVICES},
        "trainable_params": layout.trainable_params,
        "bytes": {**cats, "total": total},
    }
    if layout.lora:
        out["targets"] = list(layout.lora.targets)
        out["adapter_params"] = layout.adapter_params
    if data > 1 and fsdp == tensor == 1:
        notes.add(f"data={data} only: everything replicated, the same bytes per device as 1 "
                  "device")
    out["notes"] = sorted(notes)
    return out


def _factorisations(n: int):
    for data in range(1, n + 1):
        for fsdp in range(1, n // data + 1):
            if n % (data * fsdp) == 0:
                yield data, fsdp, n // (data * fsdp)


def recommend(layout: Layout, device: DeviceType) -> tuple[tuple[int, int, int], int, bool]:
    """The most data-parallel mesh of `device.chips` chips whose total fits FIT_FRACTION of a
    chip: the least tensor parallelism first (tensor does not split the batch; data and fsdp
    both do), then the most pure data parallelism (fewest param all-gathers). When none fits,
    the mesh with the fewest bytes per device. Returns (mesh, total bytes, fits)."""
    totals = {m: sum(layout.category_bytes(dict(zip(("data", "fsdp", "tensor"), m,
                                                    strict=True))).values())
              for m in _factorisations(device.chips)}
    order = sorted(totals, key=lambda m: (m[2], -m[0]))
    for m in order:
        if totals[m] <= FIT_FRACTION * device.gib * GIB:
            return m, totals[m], True
    best = min(order, key=lambda m: (totals[m], m[2], -m[0]))
    return best, totals[best], False


def select_models(names: Iterable[str] | None) -> list[ModelSpec]:
    if not names:
        return list(MODELS)
    chosen = []
    for name in names:
        match = [m for m in MODELS if name.lower() in (m.key, m.name.lower())]
        if not match:
            raise ValueError(f"unknown model {name!r}; choose from "
                             f"{', '.join(m.key for m in MODELS)}")
        chosen += [m for m in match if m not in chosen]
    return chosen


def compute(models: Iterable[str] | None = None, rank: int = 16,
            targets: Iterable[str] = LORA_TARGETS, frozen_dtype: str | None = None):
    """(rows, recommendations): one row per (model, full | LoRA, mesh); the fixed meshes, then
    any recommended mesh not among them. Recommendations: one per (model, full | LoRA, device
    type)."""
    targets = tuple(targets)
    rows, recs = [], []
    for spec in select_models(models):
        for layout in build_layouts(spec, [0, rank] if rank > 0 else [0], targets,
                                    frozen_dtype):
            r = layout.lora.rank if layout.lora else 0
            chosen = {d.name: recommend(layout, d) for d in DEVICES}
            meshes = [m[1:] for m in MESHES]
            meshes += [m for m, _, _ in chosen.values() if m not in meshes]
            for mesh in dict.fromkeys(meshes):
                out = row(layout, *mesh)
                out["recommended_for"] = [d for d, (m, _, ok) in chosen.items()
                                          if m == mesh and ok]
                rows.append(out)
            for d in DEVICES:
                m, total, ok = chosen[d.name]
                recs.append({
                    "model": spec.name, "lora": r, "frozen_dtype": layout.frozen_dtype,
                    "device": d.name, "chips": d.chips, "gib_per_chip": d.gib,
                    "mesh": dict(zip(("data", "fsdp", "tensor"), m, strict=True)),
                    "total": round(total / GIB, 4),
                    "fraction_of_hbm": round(total / (d.gib * GIB), 4), "fits": ok,
                })
    return rows, recs


def _gib(x: float) -> str:
    return f"{x:.2f}"


def markdown(rows: list[dict], recs: list[dict]) -> str:
    dev_cols = " | ".join(f"{d.name} ({d.gib:g} GiB)" for d in DEVICES)
    lines = [
        "Memory per device of the RLHF-PPO train state, GiB (computed by `jaxrec bench memory "
        "--markdown`). Counted: params, AdamW state, one copy of the gradients; not counted: "
        f"activations, KV cache, XLA temporaries. Fits: 'yes' within {FIT_FRACTION:.0%} of the "
        "device's memory (the rest is headroom for what is not counted), 'tight' within 100%, "
        "'no' over. LoRA: one frozen base (counted under policy) is also the reference.",
        "",
        f"| model | mesh | LoRA | frozen | policy | value | reference | reward | optimizer | "
        f"gradients | total | {dev_cols} |",
        "|" + "---|" * (11 + len(DEVICES)),
    ]
    for r in rows:
        m = r["mesh"]
        label = mesh_label(m["data"], m["fsdp"], m["tensor"])
        if m["data"] > 1 and m["fsdp"] == m["tensor"] == 1:
            label += " (= 1 device)"
        if r["recommended_for"]:
            label += f", rec. for {', '.join(r['recommended_for'])}"
        lora = f"r={r['lora']}" if r["lora"] else "full"
        cells = [r["model"], label, lora, r["frozen_dtype"]]
        cells += [_gib(r[k]) for k in (*CATEGORIES, "total")]
        cells += [r["fits"][d.name] for d in DEVICES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Recommended mesh per device type (the most data-parallel setting that fits "
              f"{FIT_FRACTION:.0%} of a chip):", "",
              "| model | LoRA | device | mesh | GiB per chip | of HBM |",
              "|---|---|---|---|---|---|"]
    for r in recs:
        m = r["mesh"]
        label = mesh_label(m["data"], m["fsdp"], m["tensor"])
        if not r["fits"]:
            label = f"does not fit (least: {label})"
        lora = f"r={r['lora']}" if r["lora"] else "full"
        lines.append(f"| {r['model']} | {lora} | {r['device']} ({r['chips']} x "
                     f"{r['gib_per_chip']:g} GiB) | {label} | {_gib(r['total'])} | "
                     f"{r['fraction_of_hbm']:.0%} |")
    uneven: dict = {}  # (model, what) -> kinds of leaf
    for r in rows:
        for note in r["notes"]:
            if ": " in note and not note.startswith("data="):
                where, what = note.split(": ", 1)
                uneven.setdefault((r["model"], what), set()).add(where.replace("block_*.", ""))
    if uneven:
        lines += ["", "Uneven splits (counted at the padded shard):", ""]
        for (model, what), kinds in sorted(uneven.items()):
            lines.append(f"- {model}: {what}: {', '.join(sorted(kinds))}")
    return "\n".join(lines)


def run(models=None, rank: int = 16, targets=LORA_TARGETS, frozen_dtype: str | None = None,
        as_markdown: bool = False, print_fn=print) -> list[dict]:
    rows, recs = compute(models, rank, targets, frozen_dtype)
    if as_markdown:
        print_fn(markdown(rows, recs))
    else:
        for r in rows:
            print_fn(json.dumps(r))
        for r in recs:
            print_fn(json.dumps({"recommendation": r}))
    return rows


__all__ = ["DEVICES", "MESHES", "MODELS", "compute", "leaf_bytes", "markdown", "recommend", "run",
           "tree_bytes"]
