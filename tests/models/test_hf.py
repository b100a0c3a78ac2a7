"""Hugging Face conversion: logit parity with transformers' PyTorch models, both directions.

Tiny random configs on CPU. Every weight (biases and norm scales included) is randomised, so
a wrong mapping of any tensor shows in the logits.
"""

import json
import pathlib
import re
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxrec.models import (  # noqa: E402
    gpt2_config,
    init_params,
    llama_config,
    load_pretrained,
    logits,
    save_pretrained,
)
from jaxrec.models.hf import load_hf  # noqa: E402

V = 64  # vocabulary of every tiny model
TOL = 1e-4


def _randomise(model, seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights appear once
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _tokens(batch=2, length=11, seed=0):
    return np.random.default_rng(seed).integers(0, V, (batch, length)).astype(np.int32)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _gpt2(**kw):
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        bos_token_id=1, eos_token_id=2, **kw,
    )
    torch.manual_seed(0)
    return _randomise(transformers.GPT2LMHeadModel(cfg))


def _llama(tie=False, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, **kw,
    )
    torch.manual_seed(0)
    return _randomise(transformers.LlamaForCausalLM(cfg))


def _qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, eos_token_id=3,
    )
    torch.manual_seed(0)
    return _randomise(transformers.Qwen2ForCausalLM(cfg))


def _mistral(**kw):
    kw.setdefault("sliding_window", None)
    cfg = transformers.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        **kw,
    )
    torch.manual_seed(0)
    return _randomise(transformers.MistralForCausalLM(cfg))


def _assert_parity(model, folder, tokens=None, tol=TOL, **load_kw):
    tokens = _tokens() if tokens is None else tokens
    cfg, params = load_pretrained(folder, **load_kw)
    ours = np.asarray(logits(cfg, params, tokens))
    theirs = _torch_logits(model, tokens)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=tol, rtol=0)
    return cfg, params


# --------------------------------------------------------------------------------------------
# Hugging Face -> jaxrec


@pytest.mark.parametrize(
    "make, arch",
    [
        (_gpt2, "GPT2LMHeadModel"),
        (lambda: _llama(tie=False), "LlamaForCausalLM"),
        (lambda: _llama(tie=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
         "LlamaForCausalLM"),
        (lambda: _llama(attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
        (_qwen2, "Qwen2ForCausalLM"),
        (_mistral, "MistralForCausalLM"),
    ],
    ids=["gpt2", "llama-gqa-untied", "llama-tied-theta500", "llama-biases", "qwen2", "mistral"],
)
def test_load_matches_transformers(make, arch, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    cfg, params = _assert_parity(model, tmp_path)
    assert cfg.architecture == arch
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in _leaves(params))


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_config_fields_are_read(tmp_path):
    _llama(tie=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
           pad_token_id=5).save_pretrained(tmp_path)
    cfg, params = load_pretrained(tmp_path)
    assert cfg.rope_theta == 500.0 and cfg.rope_style == "half"
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (4, 2, 48, V)
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 5)
    assert cfg.tie_embeddings and "lm_head" not in params
    _mistral().save_pretrained(tmp_path / "m")
    cfg = load_pretrained(tmp_path / "m")[0]
    assert cfg.dim_per_head == 16 and cfg.n_kv_heads == 1
    assert cfg.pad_id == cfg.eos_id == 2  # no pad_token_id: pad with eos


def test_mistral_sliding_window_warns(tmp_path):
    model = _mistral(sliding_window=8)  # shorter than max_position_embeddings=64
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="sliding_window=8"):
        _assert_parity(model, tmp_path, tokens=_tokens(length=8))  # exact up to the window


def test_bfloat16_checkpoint(tmp_path):
    model = _llama()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    reference = model.to(torch.float32)  # the same bf16-rounded weights, computed in float32
    _, params = _assert_parity(reference, tmp_path)
    assert params["embed"].dtype == np.float32
    cfg16, params16 = load_pretrained(tmp_path, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert params16["embed"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(params16["embed"].astype(np.float32), params["embed"])


def test_sharded_safetensors(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    _assert_parity(model, tmp_path)


def test_pytorch_bin(tmp_path):
    model = _llama()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old buffer: ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    _assert_parity(model, tmp_path)


def test_sharded_pytorch_bin(tmp_path):
    model = _qwen2()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    with open(tmp_path / "pytorch_model.bin.index.json", "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    _assert_parity(model, tmp_path)


def test_old_gpt2_pytorch_bin(tmp_path):
    """Old GPT-2 files: no 'transformer.' prefix, causal-mask buffers, a tied lm_head stored."""
    model = _gpt2()
    model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    _assert_parity(model, tmp_path)


# --------------------------------------------------------------------------------------------
# jaxrec -> Hugging Face


def _perturbed(cfg, seed=0):
    """init_params with every leaf moved off its init (biases 0 and norm scales 1 otherwise)."""
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def move(tree):
        return {k: move(v) if isinstance(v, dict)
                else np.asarray(v) + rng.normal(0, 0.1, v.shape).astype(np.float32)
                for k, v in tree.items()}

    return move(params)


_SMALL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=32)


@pytest.mark.parametrize(
    "cfg",
    [
        gpt2_config(**_SMALL),
        gpt2_config(**_SMALL, tie_embeddings=False),
        llama_config(**_SMALL, n_kv_heads=2, tie_embeddings=False, rope_theta=321.0),
        llama_config(**_SMALL, n_kv_heads=2, qkv_bias=True, out_bias=True, mlp_bias=True),
        llama_config(**_SMALL, n_kv_heads=2, qkv_bias=True, architecture="Qwen2ForCausalLM"),
        llama_config(**_SMALL, n_kv_heads=1, head_dim=16, architecture="MistralForCausalLM"),
        llama_config(**_SMALL, n_kv_heads=2, rope_style="interleaved", tie_embeddings=False),
        llama_config(**_SMALL, n_kv_heads=4, qkv_bias=True, out_bias=True,
                     rope_style="interleaved"),
    ],
    ids=["gpt2", "gpt2-untied", "llama-gqa-theta", "llama-biases", "qwen2", "mistral",
         "llama2c-interleaved", "interleaved-biases"],
)
def test_export_matches_transformers(cfg, tmp_path):
    params = _perturbed(cfg)
    out = tmp_path / "export"
    save_pretrained(cfg, params, out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == cfg.hf_architecture
    tokens = _tokens()
    ours = np.asarray(logits(cfg, params, tokens))
    np.testing.assert_allclose(_torch_logits(model.eval(), tokens), ours, atol=TOL, rtol=0)
    # And back: the exported folder loads into the same function (RoPE now rotate-half).
    cfg2, params2 = load_pretrained(out)
    assert cfg2.rope_style == "half"
    assert cfg2.replace(rope_style=cfg.rope_style, architecture=cfg.architecture) == cfg
    np.testing.assert_allclose(np.asarray(logits(cfg2, params2, tokens)), ours, atol=TOL, rtol=0)


def test_export_bfloat16_tokenizer_generation_config(tmp_path):
    cfg = llama_config(**_SMALL, eos_id=3, bos_id=-1)
    params = _perturbed(cfg)

    class Tok:
        def save_pretrained(self, path):
            with open(f"{path}/tokenizer_config.json", "w") as fh:
                fh.write("{}")

    out = save_pretrained(cfg, params, tmp_path / "out", tokenizer=Tok(), dtype="bfloat16")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    hf = transformers.AutoConfig.from_pretrained(out)
    assert (hf.eos_token_id, hf.bos_token_id, str(hf.dtype)) == (3, None, "torch.bfloat16")
    cfg2, params2 = load_pretrained(out)
    rounded = params["embed"].astype("bfloat16").astype(np.float32)
    np.testing.assert_array_equal(params2["embed"], rounded)


def test_export_failure_leaves_nothing(tmp_path):
    cfg = llama_config(**_SMALL)
    params = _perturbed(cfg)
    del params["block_1"]["mlp"]["up"]
    with pytest.raises(ValueError, match="block_1/mlp/up/kernel"):
        save_pretrained(cfg, params, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


class _FileTok:
    """A tokenizer whose save_pretrained writes `names` (and then fails, if asked)."""

    def __init__(self, *names, fail=False):
        self.names, self.fail = names, fail

    def save_pretrained(self, path):
        for name in self.names:
            (pathlib.Path(path) / name).write_text("{}")
        if self.fail:
            raise OSError("disk full")


def test_export_refuses_a_non_empty_folder_and_leaves_it_as_it_was(tmp_path):
    cfg = llama_config(**_SMALL)
    out = tmp_path / "out"
    save_pretrained(cfg, _perturbed(cfg), out, tokenizer=_FileTok("tokenizer.json"))
    (out / "jaxrec_catalogue.json").write_text('{"items": []}')  # as `jaxrec export` adds
    before = _snapshot(out)
    params = init_params(cfg, jax.random.key(1), head="both")  # another model, a value head
    with pytest.raises(FileExistsError, match=re.escape(f"{out} exists and is not an empty "
                                                        "folder")) as e:
        save_pretrained(cfg, params, out)
    _one_line(e)
    assert _snapshot(out) == before  # the old export, untouched: no new weights beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        save_pretrained(cfg, params, tmp_path / "file")

    empty = tmp_path / "empty"  # an existing empty folder is fine: it holds only the new export
    empty.mkdir()
    assert "value_head" in params  # dropped: an LM export has no place for it
    save_pretrained(cfg, params, empty)
    assert sorted(p.name for p in empty.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    _, params2 = load_pretrained(empty)
    np.testing.assert_array_equal(params2["embed"], np.asarray(params["embed"]))


def test_export_failure_midway_leaves_the_folder_as_it_was(tmp_path):
    cfg = llama_config(**_SMALL)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):  # after the weights, during the tokenizer
        save_pretrained(cfg, _perturbed(cfg), out, tokenizer=_FileTok("tokenizer.json",
                                                                       fail=True))
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(cfg, _perturbed(cfg), tmp_path / "new", tokenizer=_FileTok(fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------
# Clear, one-line errors


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_unsupported_architecture(tmp_path):
    _llama().save_pretrained(tmp_path)
    _edit_config(tmp_path, architectures=["FalconForCausalLM"])
    with pytest.raises(ValueError, match=r"FalconForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM") \
            as e:
        load_pretrained(tmp_path)
    _one_line(e)


def test_model_type_mismatch(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    _edit_config(tmp_path, architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="model_type='gpt2' does not match") as e:
        load_pretrained(tmp_path)
    _one_line(e)


def test_missing_tensor(tmp_path):
    _llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(
            "'model.layers.1.self_attn.k_proj.weight' (expected shape (16, 32)) is missing from "
            "model.safetensors")) as e:
        load_pretrained(tmp_path)
    _one_line(e)


def test_unexpected_tensor(tmp_path):
    _llama().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((3, 5), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(
            "unexpected tensor 'model.layers.0.self_attn.extra.weight' with shape (3, 5) in "
            "model.safetensors")) as e:
        load_pretrained(tmp_path)
    _one_line(e)


def test_shape_mismatch_from_config(tmp_path):
    _llama().save_pretrained(tmp_path)
    _edit_config(tmp_path, intermediate_size=40)
    with pytest.raises(ValueError, match=re.escape(
            "'model.layers.0.mlp.gate_proj.weight' in model.safetensors has shape (48, 32), but "
            "config.json implies (40, 32)")) as e:
        load_pretrained(tmp_path)
    _one_line(e)
    assert "more problems" in str(e.value)


def test_shape_mismatch_in_shard(tmp_path):
    _gpt2().save_pretrained(tmp_path, max_shard_size="8KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["transformer.wpe.weight"]
    tensors = load_file(tmp_path / file)
    tensors["transformer.wpe.weight"] = np.zeros((31, 32), np.float32)
    save_file(tensors, tmp_path / file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(
            f"'transformer.wpe.weight' in {file} has shape (31, 32), but config.json implies "
            "(32, 32)")) as e:
        load_pretrained(tmp_path)
    _one_line(e)


@pytest.mark.parametrize(
    "make, changes, match",
    [
        (_llama, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         r"rope_parameters\.rope_type='linear'"),
        (_llama, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_type='yarn'"),
        (_llama, {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        (_gpt2, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        (_gpt2, {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ],
    ids=["rope-linear", "rope-yarn", "act", "gpt2-layer-scale", "gpt2-upcast"],
)
def test_unsupported_config(make, changes, match, tmp_path):
    make().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)  # a legacy rope_scaling key is folded into rope_parameters
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(tmp_path)
    _one_line(e)


def test_load_pretrained_dispatch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither"):
        load_pretrained(tmp_path / "weights.npz")
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="PyTorch state dict"):
        load_pretrained(tmp_path / "pytorch_model.bin")
    calls = []
    fake = types.ModuleType("jaxrec.models.llama2c")
    fake.load_llama2c = lambda path, dtype=None: calls.append((path.name, dtype)) or ("cfg", {})
    monkeypatch.setitem(sys.modules, "jaxrec.models.llama2c", fake)
    (tmp_path / "stories.bin").write_bytes(b"\0" * 28)
    assert load_pretrained(tmp_path / "stories.bin", dtype="bfloat16") == ("cfg", {})
    assert calls == [("stories.bin", "bfloat16")]


def test_no_weights(tmp_path):
    _llama().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_stories260k_exports_to_transformers(shared_dir, tmp_path):
    """The real llama2.c model (interleaved RoPE, GQA) computes the same logits after export."""
    path = shared_dir / "models" / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    cfg, params = load_pretrained(path)
    save_pretrained(cfg, params, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    ours = np.asarray(logits(cfg, params, tokens))
    # Its logits reach 18 (the tiny test models' stay below 1), and torch and XLA sum in orders
    # that differ by CPU: 2.3e-5 apart on an AVX2-only EPYC. rtol 1e-5 scales the allowance
    # with the logit (1.8e-4 at 18, about 100 float32 ulps there) above the absolute floor.
    np.testing.assert_allclose(_torch_logits(model, tokens), ours, atol=TOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Corrupt folders: a one-line ValueError naming the file, never a traceback from a library


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _to_pytorch_bin(folder, state=None):
    """The folder's weights as pytorch_model.bin (torch.save of `state`, default its tensors)."""
    if state is None:
        state = {k: torch.from_numpy(v.copy())
                 for k, v in load_file(folder / "model.safetensors").items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _to_index(folder, weight_map):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {} if weight_map is None else {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle does on load: run code
        return (pathlib.Path.touch, (self.marker,))


def _evil_pickle(folder):
    import pickle

    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload(folder / "PWNED")}, fh)


CORRUPT = {
    "truncated-safetensors": (lambda f: _truncate(f / "model.safetensors"),
                              "model.safetensors: not a readable safetensors file"),
    "garbage-safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"garbage" * 20),
                            "model.safetensors: not a readable safetensors file"),
    "heads-0": (lambda f: _edit_config(f, num_attention_heads=0),
                "config.json: num_attention_heads=0 must be a positive integer"),
    "vocab-str": (lambda f: _edit_config(f, vocab_size="abc"),
                  "config.json: vocab_size='abc' must be a positive integer"),
    "hidden-65": (lambda f: _edit_config(f, hidden_size=65), r"config\.json.*\b65\b"),
    "config-list": (lambda f: (f / "config.json").write_text("[]"),
                    "config.json: expected a JSON object, got list"),
    "config-bad-json": (lambda f: (f / "config.json").write_text('{"architectures": '),
                        r"config\.json: not valid JSON \(.*: line 1 column \d+\)"),
    "index-no-weight-map": (lambda f: _to_index(f, None),
                            "model.safetensors.index.json: no 'weight_map' object"),
    "index-outside": (lambda f: _to_index(f, {"model.embed_tokens.weight": "../x.safetensors"}),
                      r"model\.safetensors\.index\.json: weight_map\['model\.embed_tokens\."
                      r"weight'\] = '\.\./x\.safetensors' is not a file in"),
    "index-absolute": (lambda f: _to_index(f, {"model.norm.weight": str(f / "config.json")}),
                       r"model\.safetensors\.index\.json: .* is not a file in"),
    "index-missing-shard": (lambda f: _to_index(f, {"a": "model-00001-of-00002.safetensors"}),
                            r"index\.json: shard 'model-00001-of-00002\.safetensors' \(for 'a'\) "
                            "is missing"),
    "bin-truncated": (lambda f: (_to_pytorch_bin(f), _truncate(f / "pytorch_model.bin")),
                      "pytorch_model.bin: not a readable PyTorch file"),
    "bin-garbage": (lambda f: (_to_pytorch_bin(f),
                               (f / "pytorch_model.bin").write_bytes(b"garbage" * 20)),
                    r"pytorch_model\.bin: torch\.load\(weights_only=True\) refused it"),
    "bin-list": (lambda f: _to_pytorch_bin(f, [torch.zeros(2)]),
                 "pytorch_model.bin: expected a state dict .*, got list"),
    "bin-non-tensor": (lambda f: _to_pytorch_bin(f, {"model.norm.weight": [1, 2]}),
                       "pytorch_model.bin: entry 'model.norm.weight' is a list, not a tensor"),
    "bin-code": (_evil_pickle, r"pytorch_model\.bin: torch\.load\(weights_only=True\) refused"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_folder_is_a_one_line_error(case, tmp_path):
    folder = tmp_path / "model"
    _llama().save_pretrained(folder)
    corrupt, match = CORRUPT[case]
    corrupt(folder)
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(folder)
    _one_line(e)
    assert str(folder) in str(e.value)
    assert not (folder / "PWNED").exists()  # a pickle never runs code
