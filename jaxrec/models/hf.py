"""Hugging Face checkpoint folders <-> (ModelConfig, params).

Reads config.json through transformers' config classes and the weights from safetensors
(single file or sharded) or, only with `weights_only` loading, pickled PyTorch files. Writes
config.json, generation_config.json and model.safetensors that transformers loads.

The conversion is strict: the complete set of tensors that the config implies is built first,
and any missing tensor, unexpected tensor or shape mismatch is a one-line ValueError naming the
tensor, the file and the shapes. There is never a silent partial load.

Params come back as host numpy arrays (float32 unless `dtype` says otherwise); place or shard
them at the jit boundary (`jax.device_put`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Callable

import ml_dtypes
import numpy as np

from jaxrec.models.config import ARCHITECTURES, DTYPES, ModelConfig

SUPPORTED = tuple(ARCHITECTURES)
# config.json without an `architectures` list: the model_type decides.
_MODEL_TYPES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# config.json sizes and counts (Llama-style and GPT-2 names): positive integers when present
_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head",
    "n_inner", "n_positions",
)

Shape = tuple[int, ...]
Path = tuple[str, ...]  # keys into the nested param dict, e.g. ('block_0', 'attn', 'q', 'kernel')


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor and how it maps onto one or more of our params."""

    name: str  # Hugging Face name, e.g. 'model.layers.0.self_attn.q_proj.weight'
    shape: Shape  # its Hugging Face shape
    paths: tuple[Path, ...]  # our params it fills
    ours: tuple[Shape, ...]  # their shapes
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF array -> one array per path
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]  # our arrays -> HF array


def _same(name: str, shape: Shape, path: Path) -> _Tensor:
    return _Tensor(name, shape, (path,), (shape,), lambda a: (a,), lambda xs: xs[0])


def _reshaped(name: str, shape: Shape, path: Path, ours: Shape) -> _Tensor:
    """Same memory order, different shape: biases, GPT-2 Conv1D weights ([in, out])."""
    return _Tensor(
        name, shape, (path,), (ours,), lambda a: (a.reshape(ours),), lambda xs: xs[0].reshape(shape)
    )


def _linear(name: str, shape: Shape, path: Path, ours: Shape) -> _Tensor:
    """torch.nn.Linear weight [out, in] <-> our kernel [in..., out...] (a transpose)."""
    out_dim, in_dim = shape
    return _Tensor(
        name,
        shape,
        (path,),
        (ours,),
        lambda a: (np.ascontiguousarray(a.T).reshape(ours),),
        lambda xs: xs[0].reshape(in_dim, out_dim).T,
    )


def _split(name: str, shape: Shape, paths: tuple[Path, ...], ours: Shape) -> _Tensor:
    """GPT-2's fused c_attn [..., 3D] <-> q, k, v each of shape `ours`."""
    n = len(paths)
    lead = shape[:-1]
    return _Tensor(
        name,
        shape,
        paths,
        (ours,) * n,
        lambda a: tuple(p.reshape(ours) for p in np.split(a, n, axis=-1)),
        lambda xs: np.concatenate([x.reshape(*lead, -1) for x in xs], axis=-1),
    )


def _gpt2_tensors(cfg: ModelConfig, prefix: str) -> list[_Tensor]:
    d, h, dh, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
    p = prefix
    out = [
        _same(f"{p}wte.weight", (v, d), ("embed",)),
        _same(f"{p}wpe.weight", (cfg.max_len, d), ("pos_embed",)),
    ]
    for i in range(cfg.n_layers):
        b, hb = f"block_{i}", f"{p}h.{i}"
        qkv = tuple((b, "attn", n, "kernel") for n in "qkv")
        qkv_b = tuple((b, "attn", n, "bias") for n in "qkv")
        out += [
            _same(f"{hb}.ln_1.weight", (d,), (b, "attn_norm", "scale")),
            _same(f"{hb}.ln_1.bias", (d,), (b, "attn_norm", "bias")),
            _split(f"{hb}.attn.c_attn.weight", (d, 3 * d), qkv, (d, h, dh)),
            _split(f"{hb}.attn.c_attn.bias", (3 * d,), qkv_b, (h, dh)),
            _reshaped(f"{hb}.attn.c_proj.weight", (d, d), (b, "attn", "o", "kernel"), (h, dh, d)),
            _same(f"{hb}.attn.c_proj.bias", (d,), (b, "attn", "o", "bias")),
            _same(f"{hb}.ln_2.weight", (d,), (b, "mlp_norm", "scale")),
            _same(f"{hb}.ln_2.bias", (d,), (b, "mlp_norm", "bias")),
            _same(f"{hb}.mlp.c_fc.weight", (d, f), (b, "mlp", "up", "kernel")),
            _same(f"{hb}.mlp.c_fc.bias", (f,), (b, "mlp", "up", "bias")),
            _same(f"{hb}.mlp.c_proj.weight", (f, d), (b, "mlp", "down", "kernel")),
            _same(f"{hb}.mlp.c_proj.bias", (d,), (b, "mlp", "down", "bias")),
        ]
    out += [
        _same(f"{p}ln_f.weight", (d,), ("final_norm", "scale")),
        _same(f"{p}ln_f.bias", (d,), ("final_norm", "bias")),
    ]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", (v, d), ("lm_head", "kernel"), (d, v)))
    return out


def _llama_tensors(cfg: ModelConfig) -> list[_Tensor]:
    d, h, kv, dh, f, v = (
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
    )
    out = [_same("model.embed_tokens.weight", (v, d), ("embed",))]
    for i in range(cfg.n_layers):
        b, hb = f"block_{i}", f"model.layers.{i}"
        out.append(_same(f"{hb}.input_layernorm.weight", (d,), (b, "attn_norm", "scale")))
        for n, heads in (("q", h), ("k", kv), ("v", kv)):
            name = f"{hb}.self_attn.{n}_proj"
            out.append(_linear(f"{name}.weight", (heads * dh, d), (b, "attn", n, "kernel"),
                               (d, heads, dh)))
            if cfg.qkv_bias:
                out.append(_reshaped(f"{name}.bias", (heads * dh,), (b, "attn", n, "bias"),
                                     (heads, dh)))
        out.append(_linear(f"{hb}.self_attn.o_proj.weight", (d, h * dh), (b, "attn", "o", "kernel"),
                           (h, dh, d)))
        if cfg.out_bias:
            out.append(_same(f"{hb}.self_attn.o_proj.bias", (d,), (b, "attn", "o", "bias")))
        out.append(_same(f"{hb}.post_attention_layernorm.weight", (d,), (b, "mlp_norm", "scale")))
        for n, hf_n, shape, ours in (
            ("gate", "gate_proj", (f, d), (d, f)),
            ("up", "up_proj", (f, d), (d, f)),
            ("down", "down_proj", (d, f), (f, d)),
        ):
            out.append(_linear(f"{hb}.mlp.{hf_n}.weight", shape, (b, "mlp", n, "kernel"), ours))
            if cfg.mlp_bias:
                out.append(_same(f"{hb}.mlp.{hf_n}.bias", (shape[0],), (b, "mlp", n, "bias")))
    out.append(_same("model.norm.weight", (d,), ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", (v, d), ("lm_head", "kernel"), (d, v)))
    return out


def _tensors(cfg: ModelConfig, gpt2_prefix: str = "transformer.") -> list[_Tensor]:
    return _gpt2_tensors(cfg, gpt2_prefix) if cfg.family == "gpt2" else _llama_tensors(cfg)


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors that checkpoints may carry but that hold no weights we need."""
    if name == "lm_head.weight" and cfg.tie_embeddings:  # a tied head saved anyway
        return True
    if cfg.family == "gpt2":  # old GPT-2 checkpoints store the causal-mask buffers
        return name.endswith((".attn.bias", ".attn.masked_bias"))
    return name.endswith("rotary_emb.inv_freq")  # older Llama checkpoints store RoPE freqs


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The gist of a (possibly many-line) exception message, on one line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:  # 'Validation error for field x:' + the cause
        text = f"{text} {lines[1]}"
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if len(text) > limit:  # keep the first sentence of a long paragraph
        cut = text.find(". ")
        text = text[: cut + 1] if 0 < cut < limit else text[:limit] + "..."
    return text


def _read_json(path: pathlib.Path):
    """A JSON file's content; ValueError naming the file (and the position) when it is not."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}: line {err.lineno} column "
                         f"{err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# ---------------------------------------------------------------------------------------------
# config.json


def _architecture(folder: pathlib.Path) -> str:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key in _SIZES:  # checked here: transformers fails on these with a traceback (or not)
        value = raw.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{path}: {key}={value!r} must be a positive integer")
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[raw["model_type"]]]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"{path}: architectures={archs} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    return archs[0]


def _token_id(value) -> int:
    if isinstance(value, list | tuple):  # e.g. Llama 3 lists several eos ids; keep the first
        value = value[0] if value else None
    return -1 if value is None else int(value)


def _rope_theta(hf, where: str) -> float:
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # transformers < 5 kept these as plain attributes
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if "rope_type" not in params and "type" not in params and params:
        raise ValueError(f"{where}: per-layer rope_parameters={params} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{where}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')"
        )
    factor = params.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        _reject(where, "rope_parameters.partial_rotary_factor", factor)
    return float(params.get("rope_theta", 10000.0))


def _reject(where: str, key: str, value) -> None:
    raise ValueError(f"{where}: {key}={value!r} is not supported by jaxrec's model")


def config_from_hf(hf, architecture: str, where: str = "config.json") -> ModelConfig:
    """A transformers config object -> our ModelConfig (raises on what we cannot compute)."""
    bos, eos, pad = (_token_id(getattr(hf, n, None)) for n in ("bos_token_id", "eos_token_id",
                                                                 "pad_token_id"))
    ids = dict(bos_id=bos, eos_id=eos, pad_id=pad if pad >= 0 else (eos if eos >= 0 else 0))
    tie = bool(getattr(hf, "tie_word_embeddings", True))
    if architecture == "GPT2LMHeadModel":
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                    "add_cross_attention"):
            if getattr(hf, key, False):
                _reject(where, key, getattr(hf, key))
        if not getattr(hf, "scale_attn_weights", True):
            _reject(where, "scale_attn_weights", False)
        if hf.activation_function not in _GPT2_ACTIVATIONS:
            _reject(where, "activation_function", hf.activation_function)
        return ModelConfig(
            family="gpt2", vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer,
            n_heads=hf.n_head, n_kv_heads=hf.n_head, d_ff=hf.n_inner or 4 * hf.n_embd,
            max_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon, activation="gelu_new",
            qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=tie,
            architecture=architecture, **ids,
        )
    if hf.hidden_act != "silu":
        _reject(where, "hidden_act", hf.hidden_act)
    theta = _rope_theta(hf, where)
    max_len = hf.max_position_embeddings
    if architecture == "LlamaForCausalLM":
        # attention_bias puts biases on q, k, v and o alike; mlp_bias on gate, up and down.
        attn_bias = bool(getattr(hf, "attention_bias", False))
        qkv_bias, out_bias, mlp_bias = attn_bias, attn_bias, bool(getattr(hf, "mlp_bias", False))
    elif architecture == "Qwen2ForCausalLM":
        qkv_bias, out_bias, mlp_bias = True, False, False  # Qwen2: biases on q, k, v only
    else:  # MistralForCausalLM: no biases
        qkv_bias = out_bias = mlp_bias = False
    # Sliding-window attention (Mistral; Qwen2 with use_sliding_window) is not implemented: we
    # always attend to the full context, which is exact for sequences up to the window length.
    window = getattr(hf, "sliding_window", None)
    if architecture == "Qwen2ForCausalLM":
        layer_types = getattr(hf, "layer_types", None) or []
        if "sliding_attention" not in layer_types and not getattr(hf, "use_sliding_window", False):
            window = None
    if window is not None and window < max_len:
        warnings.warn(
            f"{where}: sliding_window={window} < max_position_embeddings={max_len}; jaxrec attends "
            f"to the full context, so outputs differ from transformers beyond {window} tokens",
            stacklevel=3,
        )
    d, h = hf.hidden_size, hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or d // h
    return ModelConfig(
        family="llama", vocab_size=hf.vocab_size, d_model=d, n_layers=hf.num_hidden_layers,
        n_heads=h, n_kv_heads=getattr(hf, "num_key_value_heads", None) or h,
        head_dim=0 if head_dim * h == d else head_dim, d_ff=hf.intermediate_size,
        max_len=max_len, norm_eps=hf.rms_norm_eps, activation="silu", rope_theta=theta,
        rope_style="half", qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias,
        tie_embeddings=tie, architecture=architecture, **ids,
    )


def _hf_config(cfg: ModelConfig, dtype: str):
    """Our ModelConfig -> the transformers config object of cfg.hf_architecture."""
    import transformers

    arch = cfg.hf_architecture
    ids = {
        "bos_token_id": None if cfg.bos_id < 0 else cfg.bos_id,
        "eos_token_id": None if cfg.eos_id < 0 else cfg.eos_id,
        "pad_token_id": None if cfg.pad_id < 0 else cfg.pad_id,
    }
    common = dict(architectures=[arch], tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, **ids)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"cannot export to {arch}: it needs {what}")

    if cfg.family == "gpt2":
        need(arch == "GPT2LMHeadModel", "family='llama'")
        need(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "qkv_bias, out_bias and mlp_bias")
        need(cfg.n_kv_heads == cfg.n_heads, "n_kv_heads == n_heads")
        need(cfg.dim_per_head * cfg.n_heads == cfg.d_model, "head_dim * n_heads == d_model")
        need(cfg.activation == "gelu_new", "activation='gelu_new'")
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, **common,
        )
    need(arch != "GPT2LMHeadModel", "family='gpt2'")
    need(cfg.activation == "silu", "activation='silu'")
    llama = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)}, **common,
    )
    if arch == "LlamaForCausalLM":
        need(cfg.qkv_bias == cfg.out_bias, "qkv_bias == out_bias (attention_bias covers both)")
        return transformers.LlamaConfig(
            head_dim=cfg.dim_per_head, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **llama
        )
    if arch == "Qwen2ForCausalLM":
        need(cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias,
             "qkv_bias=True, out_bias=False, mlp_bias=False")
        need(cfg.dim_per_head * cfg.n_heads == cfg.d_model, "head_dim * n_heads == d_model")
        return transformers.Qwen2Config(use_sliding_window=False, sliding_window=None, **llama)
    need(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "no biases")
    return transformers.MistralConfig(head_dim=cfg.dim_per_head, sliding_window=None, **llama)


# ---------------------------------------------------------------------------------------------
# weight files


class _Weights:
    """Names, shapes and lazily read arrays of every tensor in a folder's weight files."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        self.where: dict[str, str] = {}  # tensor name -> file name
        self.shapes: dict[str, Shape] = {}
        self._torch: dict[str, dict] = {}  # file -> state dict (pickled PyTorch files only)
        self.source = self._find()

    def _find(self) -> str:
        f = self.folder
        if (f / "model.safetensors").is_file():
            self._add_safetensors("model.safetensors")
            return "model.safetensors"
        if (f / "model.safetensors.index.json").is_file():
            for name in self._index("model.safetensors.index.json"):
                self._add_safetensors(name)
            return "model.safetensors.index.json"
        if (f / "pytorch_model.bin").is_file():
            self._add_torch("pytorch_model.bin")
            return "pytorch_model.bin"
        if (f / "pytorch_model.bin.index.json").is_file():
            for name in self._index("pytorch_model.bin.index.json"):
                self._add_torch(name)
            return "pytorch_model.bin.index.json"
        raise FileNotFoundError(
            f"{f} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
            "or pytorch_model.bin.index.json"
        )

    def _index(self, index: str) -> list[str]:
        """The shard files an index names: each a plain file inside the folder."""
        path = self.folder / index
        raw = _read_json(path)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path}: no 'weight_map' object (tensor name -> shard file)")
        files = set()
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise ValueError(f"{path}: weight_map[{name!r}] = {file!r} is not a file name")
            # A bare name: no folder part, '..' or absolute path can point outside the folder.
            # (Not resolved: Hugging Face's cache links shards to blobs elsewhere, legitimately.)
            if pathlib.PurePath(file).name != file or file in (".", "..") or "\\" in file:
                raise ValueError(f"{path}: weight_map[{name!r}] = {file!r} is not a file in "
                                 f"{self.folder}")
            if not (self.folder / file).is_file():
                raise ValueError(f"{path}: shard {file!r} (for {name!r}) is missing from "
                                 f"{self.folder}")
            files.add(file)
        return sorted(files)

    def _record(self, name: str, shape, file: str) -> None:
        if name in self.where:
            raise ValueError(f"tensor {name!r} is in both {self.where[name]} and {file}")
        self.where[name] = file
        self.shapes[name] = tuple(int(s) for s in shape)

    def _add_safetensors(self, file: str) -> None:
        from safetensors import safe_open

        try:
            with safe_open(self.folder / file, framework="np") as fh:
                shapes = {name: fh.get_slice(name).get_shape() for name in fh.keys()}
        except Exception as err:  # SafetensorError: truncated, empty or not safetensors
            raise ValueError(f"{self.folder / file}: not a readable safetensors file "
                             f"({_first_line(err)})") from None
        for name, shape in shapes.items():
            self._record(name, shape, file)

    def _add_torch(self, file: str) -> None:
        import pickle

        import torch  # only for pickled checkpoints, and only with weights_only loading

        path = self.folder / file
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: torch.load(weights_only=True) refused it: not a PyTorch "
                             "state dict (corrupt, or it pickles objects other than tensors)"
                             ) from None
        except Exception as err:  # RuntimeError (bad zip), EOFError, ...
            raise ValueError(f"{path}: not a readable PyTorch file ({_first_line(err)})"
                             ) from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict (tensor name -> tensor), got "
                             f"{type(state).__name__}")
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        self._torch[file] = state
        for name, t in state.items():
            self._record(name, t.shape, file)

    def read(self, name: str) -> np.ndarray:
        try:
            return self._read(name)
        except Exception as err:
            raise ValueError(f"{self.folder / self.where[name]}: cannot read tensor {name!r} "
                             f"({_first_line(err)})") from None

    def _read(self, name: str) -> np.ndarray:
        file = self.where[name]
        if file in self._torch:
            import torch

            t = self._torch[file][name].detach()
            if t.dtype == torch.bfloat16:  # numpy has no bf16: widen exactly, then view as f32
                return t.float().numpy()
            return t.numpy()
        from safetensors import safe_open

        with safe_open(self.folder / file, framework="np") as fh:
            dtype = fh.get_slice(name).get_dtype()
            if dtype != "BF16":
                return fh.get_tensor(name)
        # safetensors' numpy backend cannot represent bfloat16; its flax backend can. Keep the
        # array on the host CPU so a large checkpoint does not go through accelerator memory.
        import jax

        with jax.default_device(jax.devices("cpu")[0]), safe_open(
            self.folder / file, framework="flax"
        ) as fh:
            return np.asarray(fh.get_tensor(name))


def _shape_str(shape: Shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check(weights: _Weights, expected: list[_Tensor], cfg: ModelConfig) -> None:
    """Every expected tensor present with its shape, nothing else: else one ValueError line."""
    problems = []
    want = {t.name: t.shape for t in expected}
    for name, shape in want.items():
        if name not in weights.shapes:
            problems.append(
                f"tensor {name!r} (expected shape {_shape_str(shape)}) is missing from "
                f"{weights.source}"
            )
        elif weights.shapes[name] != shape:
            problems.append(
                f"tensor {name!r} in {weights.where[name]} has shape "
                f"{_shape_str(weights.shapes[name])}, but config.json implies {_shape_str(shape)}"
            )
    for name, shape in weights.shapes.items():
        if name not in want and not _ignorable(name, cfg):
            problems.append(
                f"unexpected tensor {name!r} with shape {_shape_str(shape)} in "
                f"{weights.where[name]}: {cfg.hf_architecture} with this config.json has no such "
                "weight"
            )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{weights.folder}: {problems[0]}{more}")


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: Path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise ValueError(f"params have no {'/'.join(path)}")
        tree = tree[key]
    return tree


def load_hf(folder, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """A Hugging Face model folder -> (ModelConfig, params as host numpy arrays).

    Params are float32 unless `dtype` ('float32' or 'bfloat16') says otherwise; with 'bfloat16'
    the returned config's param_dtype says so too.
    """
    from transformers import AutoConfig

    folder = pathlib.Path(folder)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {DTYPES}")
    arch = _architecture(folder)
    where = str(folder / "config.json")
    try:
        hf = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers' validation: TypeError, ValueError, ZeroDivision...
        raise ValueError(f"{where}: {_first_line(err)}") from None
    model_type = next(t for t, a in _MODEL_TYPES.items() if a == arch)
    if hf.model_type != model_type:
        raise ValueError(f"{where}: model_type={hf.model_type!r} does not match "
                         f"architectures=[{arch!r}] (expected {model_type!r})")
    try:
        cfg = config_from_hf(hf, arch, where=where)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError) as err:
        if isinstance(err, ValueError) and str(err).startswith(where):
            raise  # already names the file
        raise ValueError(f"{where}: {_first_line(err)}") from None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    np_dtype = _NP_DTYPES[dtype or "float32"]

    weights = _Weights(folder)
    prefix = "transformer."
    if cfg.family == "gpt2" and not any(n.startswith(prefix) for n in weights.shapes):
        prefix = ""  # old GPT-2 checkpoints name 'h.0.ln_1.weight', not 'transformer.h.0...'
    expected = _tensors(cfg, prefix)
    _check(weights, expected, cfg)

    params: dict = {}
    for t in expected:
        array = weights.read(t.name).astype(np_dtype)
        for path, value in zip(t.paths, t.to_ours(array), strict=True):
            _set(params, path, np.ascontiguousarray(value))
    return cfg, params


# ---------------------------------------------------------------------------------------------
# export


def _rotate_half_layout(x: np.ndarray) -> np.ndarray:
    """Per head, reorder the last (Dh) axis from pairs (2i, 2i+1) to halves (i, i + Dh/2).

    Meta's convert script does the same `permute`; applied to both q and k it leaves every
    q.k dot product unchanged while turning interleaved RoPE into rotate-half RoPE.
    """
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _export_params(cfg: ModelConfig, params: dict) -> dict:
    """Params in the layout transformers computes with (rotate-half RoPE)."""
    if cfg.family != "llama" or cfg.rope_style == "half":
        return params
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for i in range(cfg.n_layers):
        attn = {k: dict(v) for k, v in params[f"block_{i}"]["attn"].items()}
        for n in ("q", "k"):
            attn[n] = {k: _rotate_half_layout(np.asarray(v)) for k, v in attn[n].items()}
        out[f"block_{i}"] = {**params[f"block_{i}"], "attn": attn}
    return out


_VALUE_HEAD = ("value_head", "value_bias")  # a policy's value head has no place in an LM export


def _leaf_paths(tree: dict, prefix: Path = ()) -> list[Path]:
    paths = []
    for k, v in tree.items():
        paths += _leaf_paths(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    return paths


def save_hf(cfg: ModelConfig, params: dict, out_dir, tokenizer=None, dtype: str = "float32"):
    """Write a Hugging Face folder (config.json, generation_config.json, model.safetensors).

    `dtype` ('float32' or 'bfloat16') is the stored weight dtype. A tokenizer with
    `save_pretrained` is saved alongside. `out_dir` must not exist or be an empty folder (as
    for `jaxrec export`): files of an earlier export would otherwise mix with these. Everything
    is written to a temporary sibling folder first and renamed into place at the end, so a
    failure leaves no half-written checkpoint and `out_dir` as it was.
    """
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    out_dir = pathlib.Path(out_dir).resolve()
    _check_out_dir(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; choose one of {DTYPES}")
    hf_cfg = _hf_config(cfg, dtype)
    expected = _tensors(cfg)
    wanted = {p for t in expected for p in t.paths}
    extra = [p for p in _leaf_paths(params) if p not in wanted and p[0] not in _VALUE_HEAD]
    if extra:
        raise ValueError(f"params have {'/'.join(extra[0])}, which {cfg.hf_architecture} has no "
                         "place for")
    params_out = _export_params(cfg, params)
    np_dtype = _NP_DTYPES[dtype]
    tensors = {}
    for t in expected:
        ours = []
        for path, want in zip(t.paths, t.ours, strict=True):
            value = np.asarray(_get(params_out, path))
            if value.shape != want:
                raise ValueError(f"params {'/'.join(path)} has shape {_shape_str(value.shape)}, "
                                 f"but the config implies {_shape_str(want)}")
            ours.append(value.astype(np.float32))
        tensors[t.name] = np.ascontiguousarray(t.to_hf(tuple(ours)).astype(np_dtype))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(hf_cfg).save_pretrained(tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        _check_out_dir(out_dir)  # still absent or empty: nothing appeared meanwhile
        try:
            # One rename of the whole folder (over an empty one, if there): all or nothing.
            os.replace(tmp, out_dir)
        except OSError as err:  # something was written into out_dir meanwhile
            raise FileExistsError(f"{out_dir} exists and is not an empty folder ({err.strerror})"
                                  ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_out_dir(out_dir: pathlib.Path) -> None:
    """Refuse to write into a file or a non-empty folder, as `jaxrec export` does: files of an
    earlier export (tokenizer, catalogue, other shards) would be mixed with ours."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; save into a new "
                              "or empty one")
