"""The run config: YAML in, `a.b=c` overrides, one-line errors naming the key."""

import pathlib

import pytest

from jaxrec.config import (
    Config,
    MeshConfig,
    PPOConfig,
    config_from_dict,
    dump_config,
    load_config,
)

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nstages: [ppo]\nppo:\n  iterations: 7\n  kl_coef: 0.1\n"
                    "rollout:\n  users: 16\ncheckpoint:\n  every: 2\n  keep: 1\n"
                    "data:\n  source: movielens-100k\n  dir: /data\n")
    cfg = load_config(path, ["ppo.iterations=9", "model.init=stories.bin", "rollout.temperature=0",
                             "ppo.dual_clip=3"])
    assert cfg.seed == 3 and cfg.stages == ("ppo",)
    assert cfg.ppo.iterations == 9 and cfg.ppo.kl_coef == 0.1 and cfg.ppo.dual_clip == 3.0
    assert cfg.rollout.users == 16 and cfg.rollout.temperature == 0.0
    assert cfg.checkpoint.every == 2 and cfg.data.dir == "/data"
    assert cfg.model.init == "stories.bin"
    assert isinstance(cfg.ppo, PPOConfig)


def test_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict({"ppo": {"epochs": 2}}, ["sim.n_items=50", "mesh.fsdp=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        ({"ppo": {"epoch": 2}}, [], r"unknown config key ppo.epoch; allowed: iterations, epochs"),
        ({}, ["ppo.epochs=two"], r"ppo.epochs must be an integer, got 'two'"),
        ({}, ["rollout.constrained=1"], r"rollout.constrained must be true or false"),
        ({"data": {"source": "netflix"}}, [], r"data.source='netflix' is not allowed; choose"),
        ({"stages": ["train"]}, [], r"stages='train' is not allowed; choose one of"),
        ({"stages": ["sft", "ppo", "ppo"]}, [], r"stages=\['sft', 'ppo', 'ppo'\] names a stage "
                                                 r"twice"),
        ({"lora": {"rank": 4, "targets": ["q", "v", "q"]}}, [],
         r"lora.targets=\['q', 'v', 'q'\] names a layer twice"),
        ({}, ["ppo.lr_schedule=step"], r"ppo.lr_schedule='step' is not allowed"),
        ({}, ["ppo.clip_low=0"], r"ppo.clip_low=0.0 must be in \(0, 1\)"),
        ({}, ["checkpoint.keep=0"], r"checkpoint.keep=0 must be >= 1"),
        ({}, ["ppo"], r"expected key=value"),
        ({"ppo": 3}, [], r"ppo must be a mapping"),
    ],
)
def test_errors_name_the_key(values, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(values, overrides)


@pytest.mark.parametrize("content, message", [
    ("ppo:\n  epochs: 2\n   iterations: [\n", r"bad.yaml line \d+: not valid YAML"),
    ("ppo:\n  epochz: 2\n", r"bad.yaml: unknown config key ppo.epochz"),
    ("seed: !!python/object/apply:os.getcwd []\n", r"bad.yaml line 1: not valid YAML"),
    (b"\xff\xfe\x00seed: 1\n", r"bad.yaml: not UTF-8 text \(byte 0\)"),
])
def test_file_errors_name_the_file_and_line(tmp_path, content, message):
    """Bad YAML, an unknown key, an unsafe tag (never constructed) and a binary file."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        load_config(bad)


def test_missing_files_and_bad_overrides_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"^--set '=1': expected key=value"):
        config_from_dict({}, ["=1"])
    with pytest.raises(ValueError, match=r"^--set ppo.epochs=\[: not valid YAML"):
        config_from_dict({}, ["ppo.epochs=["])


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.policy_lr=.nan", "ppo.policy_lr=nan must be a finite number > 0"),
        ("ppo.policy_lr=.inf", "ppo.policy_lr=inf must be a finite number > 0"),
        ("reward.lr=-1.0", "reward.lr=-1.0 must be > 0"),
        ("reward.warmup_steps=-10", "reward.warmup_steps=-10 must be >= 0"),
        ("sft.warmup_steps=-10", "sft.warmup_steps=-10 must be >= 0"),
        ("ppo.warmup_steps=-10", "ppo.warmup_steps=-10 must be >= 0"),
        ("ppo.gamma=-2.0", "ppo.gamma=-2.0 must be in [0, 1]"),
        ("ppo.lam=5.0", "ppo.lam=5.0 must be in [0, 1]"),
        ("ppo.kl_coef=-1.0", "ppo.kl_coef=-1.0 must be >= 0"),
        ("ppo.adam_b1=2.0", "ppo.adam_b1=2.0 must be in [0, 1)"),
        ("ppo.max_bad_iterations=0", "ppo.max_bad_iterations=0 must be >= 1"),
        ("ppo.max_grad_norm=-1", "ppo.max_grad_norm=-1.0 must be > 0 (or null)"),
        ("sim.n_items=-5", "sim.n_items=-5 must be >= 1"),
        ("eval.temperature=.nan", "eval.temperature=nan must be a finite number > 0"),
        ("rollout.temperature=.nan", "rollout.temperature=nan must be a finite number >= 0"),
        ("reward.mix=.nan", "reward.mix=nan must be a finite number in [0, 1]"),
        ("model.d_model=-64", "model.d_model=-64 must be >= 1"),
        ("model.n_kv_heads=3", "model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
        ("stages=[]", "stages is empty; list one or more of ('sft', 'reward', 'ppo')"),
        ("mesh.data=0", "mesh.data=0 must be >= 1 or -1 (all remaining devices)"),
        ("mesh.fsdp=-3", "mesh.fsdp=-3 must be >= 1 or -1 (all remaining devices)"),
        ("mesh.fsdp=0", "mesh.fsdp=0 must be >= 1 or -1 (all remaining devices)"),
    ],
)
def test_out_of_range_values_name_the_key_value_and_range(override, message):
    with pytest.raises(ValueError) as info:
        config_from_dict({}, [override])
    assert str(info.value) == message


def test_at_most_one_mesh_size_is_minus_one():
    with pytest.raises(ValueError, match=r"^mesh.data, mesh.fsdp are -1; at most one mesh size"):
        config_from_dict({}, ["mesh.data=-1", "mesh.fsdp=-1"])
    with pytest.raises(ValueError, match="at most one mesh size may be -1"):
        MeshConfig(data=-1, fsdp=-1, tensor=-1)
    mesh = config_from_dict({}, ["mesh.fsdp=-1", "mesh.data=2"]).mesh
    assert (mesh.data, mesh.fsdp, mesh.tensor) == (2, -1, 1)


def test_range_checks_also_guard_direct_construction():
    with pytest.raises(ValueError, match=r"^ppo.gamma=1.5 must be in \[0, 1\]$"):
        PPOConfig(gamma=1.5)
    assert PPOConfig(gamma=0.0, lam=1.0, kl_coef=0.0, adam_b1=0.0).gamma == 0.0


def test_shipped_configs_and_defaults_are_valid():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"demo.yaml", "movielens-100k.yaml", "ml1m-gpu.yaml",
                                       "ml1m-tpu-v5e-8.yaml"}
    for path in paths:
        load_config(path)
    assert load_config(None) == Config()


def test_float_fields_take_exponents_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-5 as the string '1e-5'; float fields parse it.
    cfg = config_from_dict({}, ["ppo.policy_lr=1e-5", "reward.lr=3E-4", "ppo.kl_horizon=1e4"])
    assert cfg.ppo.policy_lr == 1e-5 and cfg.reward.lr == 3e-4 and cfg.ppo.kl_horizon == 1e4
    assert isinstance(cfg.ppo.policy_lr, float)
    path = tmp_path / "exp.yaml"
    path.write_text("ppo:\n  value_lr: 2e-5\nsft:\n  lr: 1e-3\n")
    cfg = load_config(path)
    assert cfg.ppo.value_lr == 2e-5 and cfg.sft.lr == 1e-3
    with pytest.raises(TypeError, match=r"^ppo.policy_lr must be a number, got 'fast'$"):
        config_from_dict({}, ["ppo.policy_lr=fast"])
    with pytest.raises(TypeError, match="ppo.epochs must be an integer, got '1e3'"):
        config_from_dict({}, ["ppo.epochs=1e3"])  # integers stay strict


def test_duplicate_keys_are_rejected_with_file_key_and_line(tmp_path):
    top = tmp_path / "dup.yaml"
    top.write_text("stages: [sft, ppo]\nppo:\n  iterations: 40\nsft:\n  steps: 200\n"
                   "ppo:\n  kl_coef: 0.1\n")
    with pytest.raises(ValueError) as info:
        load_config(top)
    assert str(info.value) == f"{top} line 6: duplicate key 'ppo' (first at line 2)"

    nested = tmp_path / "nested.yaml"
    nested.write_text("ppo:\n  iterations: 4\n  epochs: 2\n  iterations: 5\n")
    with pytest.raises(ValueError, match=r"nested.yaml line 4: duplicate key 'iterations' "
                                         r"\(first at line 2\)"):
        load_config(nested)

    flow = tmp_path / "flow.yaml"
    flow.write_text("seed: 1\nrollout: {users: 8, users: 16}\n")
    with pytest.raises(ValueError, match=r"flow.yaml line 2: duplicate key 'users'"):
        load_config(flow)

    with pytest.raises(ValueError, match=r"--set ppo=\{epochs: 1, epochs: 2\}: duplicate key"):
        config_from_dict({}, ["ppo={epochs: 1, epochs: 2}"])


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("ppo:\n  <<: {epochs: 2, iterations: 3}\n  iterations: 5\n")
    cfg = load_config(path)
    assert cfg.ppo.epochs == 2 and cfg.ppo.iterations == 5


def test_every_config_key_is_read_by_some_code():
    """No setting is accepted and then ignored: every key of every section is read outside
    config.py (as an attribute, or by name), or through a property of its section that is."""
    import dataclasses
    import pathlib
    import re

    from jaxrec.config import Config

    package = pathlib.Path(__file__).resolve().parents[1] / "jaxrec"
    code = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    read = lambda name: re.search(rf"\.{name}\b|[\"']{name}[\"']", code) is not None
    through = {("lora", "alpha"): "scale"}  # LoRAConfig.scale = alpha / rank
    unread = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        names = ([f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value)
                 else [section.name])
        for name in names:
            if not read(through.get((section.name, name), name)):
                unread.append(f"{section.name}.{name}")
    assert unread == []
