"""Tokenizers behind one small interface: llama2.c `tokenizer.bin`, Hugging Face folders, and
offline byte-level BPE training.

Host-side only (numpy and the standard library); `transformers` and `tokenizers` are imported
inside the functions that need them, and jax never is.

Every tokenizer here encodes without special tokens unless asked (`bos=True`, `eos=True`), and
`decode` drops the control tokens (BOS, EOS, padding), so `decode(encode(text, bos=True))`
gives `text` back.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"  # SentencePiece's "▁", which llama2.c stores as a plain space


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of jaxrec needs from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size)
    bos_id: int  # begin-of-sequence id (-1: none)
    eos_id: int  # end-of-sequence id (-1: none)
    pad_id: int  # padding id (-1: none)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save_pretrained(self, directory) -> None: ...


def _ids_list(ids) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


class Llama2cTokenizer:
    """The SentencePiece-BPE vocabulary of llama2.c, read from its `tokenizer.bin`.

    Encoding follows llama2.c run.c `encode`: prepend the dummy-prefix piece " " (non-empty
    text only), look up each UTF-8 character (bytes not in the vocabulary fall back to the
    `<0xXX>` tokens), then repeatedly merge the adjacent pair whose concatenation is a piece,
    taking the highest score (the leftmost on ties). Decoding follows run.c `decode` piece by
    piece (`decode_piece`): a piece after BOS loses its leading space and `<0xXX>` is the raw
    byte. `decode` of a whole list also drops the leading space at the start (the dummy
    prefix, as SentencePiece does), skips BOS/EOS, joins the bytes and decodes UTF-8 with
    errors='replace'.
    """

    def __init__(
        self,
        pieces: Sequence[bytes],
        scores: Sequence[float],
        max_token_length: int | None = None,
        bos_id: int = 1,
        eos_id: int = 2,
        unk_id: int = 0,
    ):
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = np.asarray(scores, np.float32)
        self.max_token_length = max_token_length or max(len(p) for p in self.pieces)
        self.vocab_size = len(self.pieces)
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = -1  # llama2.c has no padding token
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        # run.c hard-codes byte b -> id b + 3; look the pieces up, with that as the fallback
        self._byte_ids = [self._lookup.get(b"<0x%02X>" % b, b + 3) for b in range(256)]
        self._piece_bytes: list[bytes] = []
        for p in self.pieces:
            m = _BYTE_PIECE.match(p)
            self._piece_bytes.append(bytes([int(m.group(1), 16)]) if m else p)

    @classmethod
    def from_file(cls, path) -> Llama2cTokenizer:
        """Read llama2.c tokenizer.bin: int32 max_token_length, then per token
        float32 score, int32 byte length, bytes."""
        path = pathlib.Path(path)
        raw = path.read_bytes()
        if len(raw) < 4:
            raise ValueError(f"{path}: too short for a llama2.c tokenizer ({len(raw)} bytes)")
        (max_len,) = struct.unpack_from("<i", raw, 0)
        pos, pieces, scores = 4, [], []
        while pos < len(raw):
            if pos + 8 > len(raw):
                raise ValueError(f"{path}: truncated llama2.c tokenizer at byte {pos}")
            score, n = struct.unpack_from("<fi", raw, pos)
            pos += 8
            if n < 0 or pos + n > len(raw):
                raise ValueError(f"{path}: bad piece length {n} at byte {pos - 4}")
            pieces.append(raw[pos : pos + n])
            scores.append(score)
            pos += n
        if not pieces:
            raise ValueError(f"{path}: a llama2.c tokenizer with no pieces")
        return cls(pieces, scores, max_token_length=max_len)

    def to_file(self, path) -> None:
        """Write llama2.c tokenizer.bin (the inverse of `from_file`)."""
        out = [struct.pack("<i", self.max_token_length)]
        for p, s in zip(self.pieces, self.scores, strict=True):
            out.append(struct.pack("<fi", float(s), len(p)) + p)
        _atomic_write(pathlib.Path(path), b"".join(out))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        if text and b" " in self._lookup:
            ids.append(self._lookup[b" "])  # the dummy prefix
        for ch in text:
            b = ch.encode("utf-8")
            tid = self._lookup.get(b)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_ids[x] for x in b)
        while len(ids) > 1:  # merge the best pair until none is in the vocabulary
            best_score, best_i, best_id = -np.inf, -1, -1
            for i in range(len(ids) - 1):
                tid = self._lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if tid is not None and self.scores[tid] > best_score:
                    best_score, best_i, best_id = self.scores[tid], i, tid
            if best_i < 0:
                break
            ids[best_i : best_i + 2] = [best_id]
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_piece(self, prev_id: int, token_id: int) -> bytes:
        """run.c `decode`: the bytes of one token that follows `prev_id`."""
        piece = self.pieces[token_id]
        if prev_id == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: Iterable[int]) -> str:
        out, prev = [], self.bos_id  # the start of the text counts as 'after BOS'
        for tid in _ids_list(ids):
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id {tid} is outside the vocabulary [0, {self.vocab_size})")
            if tid not in (self.bos_id, self.eos_id):
                out.append(self.decode_piece(prev, tid))
            prev = tid
        return b"".join(out).decode("utf-8", errors="replace")

    # -- Hugging Face export -------------------------------------------------------------------

    def to_hf(self) -> HFTokenizer:
        """The same vocabulary as a Hugging Face fast tokenizer (SentencePiece-style BPE with
        byte fallback, as transformers' Llama tokenizer), for exporting a model folder.

        The merges are every split (a, b) of every piece, ranked by the piece's score, which is
        how llama2.c's score-greedy merging is expressed as BPE ranks.
        """
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, normalizers
        from transformers import PreTrainedTokenizerFast

        special = {self.unk_id: "<unk>", self.bos_id: "<s>", self.eos_id: "</s>"}
        names: list[str] = []
        for i, p in enumerate(self.pieces):
            if i in special:
                names.append(special[i])
            elif _BYTE_PIECE.match(p):
                names.append(p.decode("ascii").upper().replace("0X", "0x"))
            else:
                names.append(p.decode("utf-8", errors="replace").replace(" ", _SPM_SPACE))
        vocab: dict[str, int] = {}
        for i, n in enumerate(names):
            vocab.setdefault(n, i)
        mergeable = [
            i for i, p in enumerate(self.pieces)
            if i not in special and not _BYTE_PIECE.match(p) and len(names[i]) > 1
        ]
        mergeable.sort(key=lambda i: (-float(self.scores[i]), i))
        merges = []
        for i in mergeable:
            n = names[i]
            for cut in range(1, len(n)):
                a, b = n[:cut], n[cut:]
                if a in vocab and b in vocab:
                    merges.append((a, b))
        raw = RawTokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                       fuse_unk=True)
        )
        raw.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPM_SPACE), normalizers.Replace(" ", _SPM_SPACE)]
        )
        raw.decoder = decoders.Sequence([
            decoders.Replace(_SPM_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ])
        hf = PreTrainedTokenizerFast(
            tokenizer_object=raw,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            clean_up_tokenization_spaces=False,
        )
        return HFTokenizer(hf)

    def save_pretrained(self, directory) -> None:
        """A Hugging Face tokenizer folder (see `to_hf`) plus the original `tokenizer.bin`."""
        directory = pathlib.Path(directory)
        self.to_hf().save_pretrained(directory)
        self.to_file(directory / "tokenizer.bin")


# ---------------------------------------------------------------------------------------------
# Hugging Face


class HFTokenizer:
    """A transformers tokenizer behind the `Tokenizer` interface (`.hf` is the wrapped one)."""

    def __init__(self, hf):
        self.hf = hf

    @classmethod
    def from_pretrained(cls, folder) -> HFTokenizer:
        """Load a local folder: a Hugging Face tokenizer, or OpenAI's original GPT-2 files
        (`encoder.json` + `vocab.bpe`, or `vocab.json` + `merges.txt` without a config)."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a directory")
        hf_files = ("tokenizer.json", "tokenizer_config.json")
        has_hf = any((folder / f).is_file() for f in hf_files)
        if has_hf or (folder / "config.json").is_file():
            if not (folder / "tokenizer.json").is_file() and not any(
                (folder / f).is_file() for f in _VOCAB_FILES
            ):
                found = [f for f in ("tokenizer_config.json", "config.json")
                         if (folder / f).is_file()]
                raise ValueError(
                    f"{folder}: no tokenizer files (has {' and '.join(found)} but no "
                    "tokenizer.json, vocab.json + merges.txt or tokenizer.model)"
                )
            return cls(_auto_tokenizer(folder))
        gpt2_files = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
        for vocab_name, merges_name in gpt2_files:
            if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
                return cls(_gpt2_from_files(folder / vocab_name, folder / merges_name))
        raise ValueError(
            f"{folder}: no tokenizer found (need tokenizer.json / tokenizer_config.json, or "
            "GPT-2 encoder.json + vocab.bpe)"
        )

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int:
        return _id_or_none(self.hf.bos_token_id)

    @property
    def eos_id(self) -> int:
        return _id_or_none(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        return _id_or_none(self.hf.pad_token_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if bos:
            if self.bos_id < 0:
                raise ValueError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id < 0:
                raise ValueError("this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(
            _ids_list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def save_pretrained(self, directory) -> None:
        self.hf.save_pretrained(str(directory))


def _id_or_none(i) -> int:
    return -1 if i is None else int(i)


# Vocabulary files transformers' slow tokenizers read (besides tokenizer.json)
_VOCAB_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model", "tiktoken.model")


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The gist of a (possibly many-line) exception message, on one line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    return text if len(text) <= limit else text[:limit] + "..."


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_json(path: pathlib.Path):
    """A JSON file's content; ValueError naming the file and the position when it is not."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}: line {err.lineno} column "
                         f"{err.colno})") from None


def _auto_tokenizer(folder: pathlib.Path):
    """transformers' AutoTokenizer on a local folder; its errors as one line naming the file."""
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file() and not isinstance(_read_json(folder / name), dict):
            raise ValueError(f"{folder / name}: expected a JSON object")
    blame = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else folder
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # KeyError, ValueError, Exception from the `tokenizers` library
        raise ValueError(f"{blame}: cannot load the tokenizer ({_first_line(err)})") from None


def _gpt2_from_files(vocab_path: pathlib.Path, merges_path: pathlib.Path):
    """OpenAI's GPT-2 byte-level BPE from encoder.json + vocab.bpe."""
    from transformers import GPT2TokenizerFast

    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in vocab.items()
    ):
        raise ValueError(f"{vocab_path}: expected a JSON object of token -> integer id")
    merges = []
    for lineno, line in enumerate(_read_text(merges_path).split("\n"), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{merges_path}, line {lineno}: expected a merge of 2 tokens "
                             f"separated by one space, got {len(pair)} fields: {line[:80]!r}")
        for token in (*pair, pair[0] + pair[1]):
            if token not in vocab:
                raise ValueError(f"{merges_path}, line {lineno}: token {token!r} is not in "
                                 f"{vocab_path.name}")
        merges.append(tuple(pair))
    try:
        return GPT2TokenizerFast(vocab=vocab, merges=merges)
    except Exception as err:  # the `tokenizers` library's own checks
        raise ValueError(f"{merges_path}: cannot build the GPT-2 tokenizer "
                         f"({_first_line(err)})") from None


# ---------------------------------------------------------------------------------------------
# Loading and training


def load_tokenizer(path) -> Tokenizer:
    """A folder -> HFTokenizer (or a Llama2cTokenizer when it holds only `tokenizer.bin`);
    a `.bin` file -> Llama2cTokenizer."""
    path = pathlib.Path(path)
    if path.is_dir():
        hf_like = ("tokenizer.json", "tokenizer_config.json", "config.json", "encoder.json",
                   "vocab.json")
        if not any((path / f).is_file() for f in hf_like) and (path / "tokenizer.bin").is_file():
            return Llama2cTokenizer.from_file(path / "tokenizer.bin")
        return HFTokenizer.from_pretrained(path)
    if path.is_file() and path.suffix == ".bin":
        return Llama2cTokenizer.from_file(path)
    raise ValueError(
        f"{path}: not a tokenizer (expected a Hugging Face folder or a llama2.c .bin file)"
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir=None,
    special_tokens: Sequence[str] = ("<pad>", "<s>", "</s>"),
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on `texts`, offline, with the `tokenizers` library.

    `special_tokens` are (pad, bos, eos, *extra) and take ids 0, 1, 2, ...; the 256 byte
    symbols follow, then the merges, up to `vocab_size` ids in all. With `out_dir`, the result
    is saved as a Hugging Face folder that `AutoTokenizer.from_pretrained` loads.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(special_tokens)
    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(
            f"special_tokens={special_tokens!r} must be distinct (pad, bos, eos, *extra)"
        )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the bytes and special tokens need {smallest}"
        )
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    pad, bos, eos, *extra = special_tokens
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=extra or None,
        clean_up_tokenization_spaces=False,
    )
    tok = HFTokenizer(hf)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
