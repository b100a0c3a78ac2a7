"""The run config: YAML in, `a.b=c` overrides, one-line errors naming the key."""

import pytest

from jaxrec.config import Config, PPOConfig, config_from_dict, dump_config, load_config


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
        ({}, ["ppo.lr_schedule=step"], r"ppo.lr_schedule='step' is not allowed"),
        ({}, ["ppo.clip_low=0"], r"ppo.clip_low=0.0 must be > 0"),
        ({}, ["checkpoint.keep=0"], r"checkpoint.keep=0 must be >= 1"),
        ({}, ["ppo"], r"expected key=value"),
        ({"ppo": 3}, [], r"ppo must be a mapping"),
    ],
)
def test_errors_name_the_key(values, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(values, overrides)


def test_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  epochs: 2\n   iterations: [\n")
    with pytest.raises(ValueError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("ppo:\n  epochz: 2\n")
    with pytest.raises(ValueError, match=r"wrong.yaml: unknown config key ppo.epochz"):
        load_config(wrong)
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
