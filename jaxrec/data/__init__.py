"""Host-side data: readers, splits, item texts and tokenizers (numpy only; never imports jax)."""

from jaxrec.data.tokenizers import (
    HFTokenizer,
    Llama2cTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "HFTokenizer",
    "Llama2cTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]
