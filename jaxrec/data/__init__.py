"""Host-side data: readers, splits, item texts and tokenizers (numpy only; never imports jax)."""

from jaxrec.data.movielens import (
    load_movielens,
    parse_title,
    read_movielens_items,
    read_movielens_raw,
)
from jaxrec.data.movielens_tfds import load_movielens_tfds
from jaxrec.data.ratings import (
    Items,
    PreferencePairs,
    Ratings,
    Split,
    Users,
    histories,
    k_core,
    leave_one_out,
    make_ratings,
    preference_pairs,
)
from jaxrec.data.tokenizers import (
    HFTokenizer,
    Llama2cTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "HFTokenizer",
    "Items",
    "Llama2cTokenizer",
    "PreferencePairs",
    "Ratings",
    "Split",
    "Tokenizer",
    "Users",
    "histories",
    "k_core",
    "leave_one_out",
    "load_movielens",
    "load_movielens_tfds",
    "load_tokenizer",
    "make_ratings",
    "parse_title",
    "preference_pairs",
    "read_movielens_items",
    "read_movielens_raw",
    "train_bpe_tokenizer",
]
