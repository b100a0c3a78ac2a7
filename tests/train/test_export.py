"""`jaxrec export`: a Hugging Face folder transformers loads, with the catalogue and template
that turn histories into prompts and generated tokens back into items."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.codec import render_prompts, render_slates
from jaxrec.config import load_config
from jaxrec.models import logits
from jaxrec.train.export import load_export, parse_slate, prompt_ids
from jaxrec.train.setup import build_setup

TINY = ["rollout.users=8", "ppo.minibatches=2", "ppo.epochs=1", "sim.n_items=30",
        "sim.n_topics=3", "rollout.history_items=2", "model.d_model=32", "model.n_layers=1",
        "ppo.iterations=2", "monitor.eval_every=0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    argv = ["ppo", "--workdir", str(workdir)]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    out = workdir.parent / "exported"
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    return workdir, out


@pytest.fixture(scope="module")
def loaded(exported):
    """The run's setup and trained params, the exported files, and transformers' view of them."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxrec.train.export import _latest_policy

    workdir, out = exported
    config = load_config(workdir / "config.yaml")
    setup = build_setup(config)
    template, items = load_export(out)
    params = _latest_policy(workdir, config, setup, "ppo")[1]
    hf_tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    return setup, template, items, params, hf_tok, model


def test_export_writes_a_folder_transformers_loads_with_our_logits(loaded):
    import torch

    setup, template, items, params, hf_tok, model = loaded
    assert template["stage"] == "ppo" and len(items) == 30

    encode = lambda text: hf_tok.encode(text, add_special_tokens=False)
    history = [3, 17, 5]
    ids = prompt_ids(encode, template, items, history, bos_id=hf_tok.bos_token_id)
    # the same ids the policy saw during training (the two most recent items)
    ours, valid = render_prompts(setup.codec, jnp.asarray([history]), setup.spec.prompt_len)
    assert ids == [int(t) for t, v in zip(ours[0], valid[0], strict=True) if v]

    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    mine = np.asarray(logits(setup.model.replace(dtype="float32"), params, jnp.asarray([ids])))[0]
    np.testing.assert_allclose(theirs, mine, atol=2e-4, rtol=1e-4)
    assert not np.allclose(np.asarray(params["embed"]), np.asarray(setup.params["embed"]))


def test_generated_tokens_map_back_to_items(exported):
    workdir, out = exported
    setup = build_setup(load_config(workdir / "config.yaml"))
    template, items = load_export(out)
    slates = np.array([[4, 0, 29], [7, 8, 9]])
    tokens, mask = render_slates(setup.codec, jnp.asarray(slates), setup.spec.max_new_tokens)
    for row, slate in zip(np.asarray(tokens), slates, strict=True):
        assert parse_slate(row.tolist(), template, items) == slate.tolist()
    broken = np.asarray(tokens)[0].tolist()
    broken[0] = template["slate_sep_id"]  # an empty block names no item
    assert parse_slate(broken, template, items)[0] == -1
    assert [x["title"] for x in items] == setup.titles


def test_export_refuses_a_used_folder_and_an_empty_run(exported, tmp_path, capsys):
    workdir, out = exported
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((workdir / "config.yaml").read_text())
    assert main(["export", "--workdir", str(empty), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no trained policy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert json.loads((out / "jaxrec_template.json").read_text())["history_items"] == 2


def test_constrained_hf_generation_gives_our_greedy_slate(loaded):
    import torch

    from jaxrec.codec import decode_slate, history_mask, slate_constraint
    from jaxrec.generation import generate
    from jaxrec.train.export import allowed_tokens_fn

    setup, template, items, params, tok, model = loaded
    k = template["slate_size"]
    for history in ([3, 17, 5], [0, 1], [29, 12, 7, 8]):
        hist = jnp.asarray([history])
        prompt, valid = render_prompts(setup.codec, hist, setup.spec.prompt_len)
        banned = history_mask(setup.codec, hist)
        ours = generate(setup.model.replace(dtype="float32"), params, prompt, valid,
                        jax.random.key(0), max_new_tokens=setup.spec.max_new_tokens,
                        constraint=slate_constraint(setup.codec, k, banned, setup.model.vocab_size),
                        eos_id=template["eos_id"])
        mine = decode_slate(setup.codec, ours.tokens, ours.mask, k, banned)[0][0].tolist()

        ids = prompt_ids(lambda t: tok.encode(t, add_special_tokens=False), template, items,
                         history, bos_id=tok.bos_token_id)
        with torch.no_grad():
            theirs = model.generate(
                torch.tensor([ids]), max_new_tokens=setup.spec.max_new_tokens, do_sample=False,
                prefix_allowed_tokens_fn=allowed_tokens_fn(template, items, len(ids), history))
        slate = parse_slate(theirs[0, len(ids):].tolist(), template, items)
        assert slate == mine and len(set(slate)) == k
        assert all(0 <= i < len(items) and i not in history for i in slate)
