"""`jaxrec bench memory`: the per-device bytes are checked against hand counts from the model
shapes (not against the module's own arithmetic) and against the abstract state's nbytes."""

import json
import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec.bench import memory
from jaxrec.cli import main
from jaxrec.models import init_params, lora
from jaxrec.train.mesh import param_specs

ONE = {"data": 1, "fsdp": 1, "tensor": 1}
FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
SCALARS = 256  # bound on optimizer counters, the step and the KL controller (bytes)


@pytest.fixture(scope="module")
def layouts():
    """{model key: (full layout, LoRA r=16 layout)}: one trace per model, shared by the tests."""
    return {spec.key: tuple(memory.build_layouts(spec, (0, 16))) for spec in memory.MODELS}


def _gpt2_small_params():
    """GPT-2 small from its shapes: token + position tables, 12 blocks, the final LayerNorm."""
    v, t, d, f, n = 50257, 1024, 768, 3072, 12
    block = 4 * d * d + 4 * d  # q, k, v, o kernels + biases
    block += d * f + f + f * d + d  # MLP up, down with biases
    block += 2 * 2 * d  # two LayerNorms (scale, bias)
    return v * d + t * d + n * block + 2 * d


def test_leaf_bytes_divides_by_the_named_axes_with_a_ceiling():
    mesh = {"data": 2, "fsdp": 4, "tensor": 8}
    notes = set()
    # embed [50257, 768] split (tensor, fsdp): 50257 / 8 does not divide -> ceil 6283
    assert memory.leaf_bytes((50257, 768), 4, P("tensor", "fsdp"), mesh, notes, "embed") == (
        4 * 6283 * 192)
    assert notes == {"embed: 50257 over tensor=8 does not divide (counted as 6283 per device)"}
    # a dim over two axes, a missing trailing entry (replicated), data never splits params
    assert memory.leaf_bytes((64, 10, 3), 2, P(("data", "fsdp"),), mesh) == 2 * 8 * 10 * 3
    assert memory.leaf_bytes((), 4, P(), mesh) == 4


def test_gpt2_full_finetune_on_one_device_matches_a_hand_count(layouts):
    n = _gpt2_small_params()
    assert n == 124_439_808
    full, _ = layouts["125m"]
    assert full.params == n and full.frozen_dtype == "float32"
    head = 768 + 1  # value head + bias
    got = full.category_bytes(ONE)
    assert got["policy"] == 4 * n
    assert got["value"] == 4 * (n + head)  # tied head: the backbone is the whole network
    assert got["reference"] == 4 * n
    assert got["reward"] == 4 * (n + head) + 2 * 4  # + float32 mean and std
    assert got["gradients"] == 4 * n + 4 * (n + head)
    adam = 8 * n + 8 * (n + head)  # mu and nu, float32, of policy and value
    assert 0 < got["optimizer"] - adam < SCALARS
    hand = 4 * n + 4 * (n + head) + 4 * n + 4 * (n + head) + 8 + adam + 4 * n + 4 * (n + head)
    assert 0 < sum(got.values()) - hand < SCALARS

    (row,) = [r for r in memory.compute(["125m"], rank=0)[0] if r["mesh"] == ONE]
    assert row["bytes"]["total"] == sum(got.values())
    assert row["total"] == pytest.approx(sum(got.values()) / 2**30, abs=1e-4)


def test_one_device_bytes_equal_the_abstract_state_nbytes():
    """Independent of the spec arithmetic: the whole state (+ one gradient copy) by nbytes."""
    spec = memory.MODELS[0]
    cfg = spec.config()
    for lora_cfg, dtype in ((None, "float32"), (memory.LoRAConfig(rank=4), "bfloat16")):
        _, (state,) = memory.abstract_states(cfg, [lora_cfg], [dtype])
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
        expected = nbytes(state) + nbytes(state.policy) + nbytes(state.value)
        layout = memory.build_layout(spec, lora_cfg.rank if lora_cfg else 0, frozen_dtype=dtype)
        assert sum(layout.category_bytes(ONE).values()) == expected


def test_fsdp8_divides_the_sharded_leaves_by_8(layouts):
    full, _ = layouts["125m"]
    # replicated over fsdp: the q/k/v biases [heads, head_dim] and the MLP up bias [d_ff]
    r = 12 * (3 * 768 + 3072)
    abstract = jax.eval_shape(lambda k: init_params(full.cfg, k), jax.random.key(0))
    specs = param_specs(full.cfg, abstract)
    no_fsdp = sum(x.size for x, s in zip(jax.tree.leaves(abstract),
                                         jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
                                         strict=True) if "fsdp" not in jax.tree.leaves(tuple(s)))
    assert no_fsdp == r
    one, eight = full.category_bytes(ONE), full.category_bytes(FSDP8)
    extra = {k: 8 * eight[k] - one[k] for k in one}  # 7 x the replicated bytes
    assert extra["policy"] == 7 * 4 * r
    assert extra["reference"] == 7 * 4 * r
    assert extra["value"] == 7 * 4 * (r + 1)  # + value_bias
    assert extra["reward"] == 7 * (4 * (r + 1) + 8)  # + mean, std
    assert extra["gradients"] == 7 * 4 * (2 * r + 1)
    assert 7 * 8 * (2 * r + 1) <= extra["optimizer"] <= 7 * (8 * (2 * r + 1) + SCALARS)
    assert sum(eight.values()) < sum(one.values()) / 8 * 1.01
    # data=8 replicates everything: the bytes of one device
    assert full.category_bytes({"data": 8, "fsdp": 1, "tensor": 1}) == one


def _adapter_count(cfg, rank, targets):
    """rank x (in + out) of every target layer, from the config alone."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head, \
        cfg.d_ff
    layers = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "up": (d, f),
              "down": (f, d)}
    if cfg.family == "llama":
        layers["gate"] = (d, f)
    return cfg.n_layers * sum(rank * (i + o) for name, (i, o) in layers.items()
                              if name in targets)


def test_adapter_count_for_llama_7b_by_hand(layouts):
    _, lora_layout = layouts["7b"]
    # per layer: q, k, v, o 4096*r + r*4096; gate, up 4096*r + r*11008; down 11008*r + r*4096
    per_set = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert per_set == _adapter_count(lora_layout.cfg, 16, memory.LORA_TARGETS) == 39_976_960
    assert lora_layout.adapter_params == 2 * per_set  # policy and value adapter sets


@pytest.mark.parametrize("key", ["125m", "1b", "7b"])
def test_lora_rows_share_the_base_and_train_only_adapters(layouts, key):
    full, lo = layouts[key]
    cfg = lo.cfg
    per_set = _adapter_count(cfg, 16, memory.LORA_TARGETS)
    abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    made = jax.eval_shape(lambda k: lora.init_adapters(abstract, 16, memory.LORA_TARGETS, k),
                          jax.random.key(0))
    assert lora.count_adapter_params(made) == per_set
    assert lo.adapter_params == 2 * per_set
    trainable = 2 * per_set + cfg.d_model + 1  # two adapter sets + value head and bias
    assert lo.trainable_params == trainable and lo.frozen_dtype == "bfloat16"
    got = lo.category_bytes(ONE)
    assert got["reference"] == 0
    assert got["policy"] == 2 * full.params + 4 * per_set  # bf16 base + f32 adapters
    assert got["value"] == 4 * (per_set + cfg.d_model + 1)
    assert got["gradients"] == 4 * trainable
    assert 0 < got["optimizer"] - 8 * trainable < SCALARS
    reward_params = full.params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    assert got["reward"] == 2 * (reward_params + cfg.d_model + 1) + 8
    assert sum(got.values()) < sum(full.category_bytes(ONE).values()) / 4


def test_recommendations_follow_the_preference_order(layouts):
    for full_or_lora in layouts["7b"]:
        for device in memory.DEVICES:
            mesh, total, ok = memory.recommend(full_or_lora, device)
            assert math.prod(mesh) == device.chips
            budget = memory.FIT_FRACTION * device.gib * 2**30
            assert ok == (total <= budget)
            meshes = sorted(memory._factorisations(device.chips), key=lambda m: (m[2], -m[0]))
            totals = {m: sum(full_or_lora.category_bytes(
                dict(zip(("data", "fsdp", "tensor"), m, strict=True))).values()) for m in meshes}
            if ok:  # every more data-parallel mesh before it is over budget
                assert all(totals[m] > budget for m in meshes[:meshes.index(mesh)])
            else:
                assert total == min(totals.values()) > budget
    full, _ = layouts["7b"]
    assert memory.recommend(full, memory.DEVICES[0])[2] is False  # 7B full FT on a v5e-8


def test_cli_json_rows(capsys):
    assert main(["bench", "memory", "--models", "125m", "--rank", "4", "--targets", "q", "v"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows = [x for x in lines if "recommendation" not in x]
    recs = [x["recommendation"] for x in lines if "recommendation" in x]
    assert {r["lora"] for r in rows} == {0, 4} and len(recs) == 2 * len(memory.DEVICES)
    for r in rows:
        assert r["model"] == "GPT-2 small (125M)" and r["params"] == _gpt2_small_params()
        assert set(r["mesh"]) == {"data", "fsdp", "tensor"}
        parts = [r[k] for k in ("policy", "value", "reference", "reward", "optimizer",
                                "gradients")]
        assert r["total"] == pytest.approx(sum(parts), abs=1e-3)
        assert set(r["fits"]) == {d.name for d in memory.DEVICES}
        if r["lora"]:
            assert r["reference"] == 0 and r["frozen_dtype"] == "bfloat16"
            assert r["adapter_params"] == 2 * 12 * 4 * 2 * (768 + 768)
    by_mesh = {(r["lora"], tuple(r["mesh"].values())): r for r in rows}
    assert by_mesh[(0, (8, 1, 1))]["bytes"] == by_mesh[(0, (1, 1, 1))]["bytes"]
    assert any("replicated" in n for n in by_mesh[(0, (8, 1, 1))]["notes"])
    assert any("50257 over tensor=8" in n for n in by_mesh[(0, (1, 1, 8))]["notes"])


def test_cli_markdown_names_the_three_models(capsys):
    assert main(["bench", "memory", "--markdown"]) == 0
    out = capsys.readouterr().out
    for name in ("GPT-2 small (125M)", "Llama-3.2-1B", "Llama-2-7B"):
        assert name in out
    assert "| model | mesh | LoRA |" in out and "Recommended mesh" in out
