"""One entry point for pretrained checkpoints: Hugging Face folders and llama2.c files."""

from __future__ import annotations

import pathlib

from jaxrec.models.config import ModelConfig


def load_pretrained(path, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """A checkpoint -> (ModelConfig, params as host numpy arrays).

    `path` is a Hugging Face model folder (config.json + safetensors or pytorch_model.bin) or a
    llama2.c `.bin` file. Params are float32 unless `dtype` ('float32' | 'bfloat16') says
    otherwise.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        from jaxrec.models.hf import load_hf

        return load_hf(path, dtype=dtype)
    if path.suffix == ".bin":
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":  # a zip archive: torch.save's format, not llama2.c's
            raise ValueError(
                f"{path} is a PyTorch state dict; pass the Hugging Face folder that holds it "
                "(with its config.json)"
            )
        from jaxrec.models.llama2c import load_llama2c

        return load_llama2c(path, dtype=dtype)
    raise ValueError(
        f"{path} is neither a Hugging Face model folder nor a llama2.c .bin file"
    )


def save_pretrained(
    cfg: ModelConfig, params: dict, out_dir, tokenizer=None, dtype: str = "float32"
) -> pathlib.Path:
    """Write a Hugging Face folder that transformers' AutoModelForCausalLM loads.

    `dtype` is the stored weight dtype ('float32' | 'bfloat16'); a tokenizer with
    `save_pretrained` is saved alongside. `out_dir` must be new or empty (FileExistsError
    otherwise): the folder is written beside it and moved into place whole, so a failure
    leaves nothing half-written and no file of an earlier model is mixed in.
    """
    from jaxrec.models.hf import save_hf

    return save_hf(cfg, params, out_dir, tokenizer=tokenizer, dtype=dtype)
