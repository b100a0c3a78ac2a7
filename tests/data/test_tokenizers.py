"""Tokenizers: llama2.c tokenizer.bin (run.c semantics), GPT-2 files, Hugging Face folders,
offline byte-level BPE training, and the no-jax import rule."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxrec.data import (
    HFTokenizer,
    Llama2cTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

TEXTS = [
    "Once upon a time",
    'Lily\'s mom said, "Lily, let\'s go to the park."\nThe end.',
    "Héllo wörld — naïve café, 日本語, emoji 🙂!",
    "  two leading spaces, a tab\tand trailing spaces  ",
    "x",
    "",
]


@pytest.fixture(scope="module")
def stories(shared_dir):
    return shared_dir / "models" / "stories260K"


@pytest.fixture(scope="module")
def tok512(stories):
    return Llama2cTokenizer.from_file(stories / "tok512.bin")


@pytest.fixture(scope="module")
def gpt2(shared_dir):
    return load_tokenizer(shared_dir / "models" / "gpt2-tokenizer")


def test_tok512_metadata(tok512):
    assert isinstance(tok512, Tokenizer)
    assert (tok512.vocab_size, tok512.bos_id, tok512.eos_id, tok512.pad_id) == (512, 1, 2, -1)
    assert tok512.max_token_length == 7
    assert tok512.pieces[259] == b" t"  # the first merge; SentencePiece's "▁" is a space here


def test_tok512_encode_as_run_c(tok512):
    ids = tok512.encode("Once upon a time")
    # the dummy-prefix space merges into " Once"; every id is a merge, none a byte fallback
    assert [tok512.pieces[i] for i in ids] == [b" Once", b" upon", b" a", b" time"]
    assert tok512.encode("Once upon a time", bos=True, eos=True) == [1, *ids, 2]
    assert tok512.decode(ids) == "Once upon a time"
    assert tok512.encode("") == []
    # a character outside the vocabulary falls back to its UTF-8 bytes (id = byte + 3)
    space = tok512.pieces.index(b" ")
    assert tok512.encode("日") == [space, 0xE6 + 3, 0x97 + 3, 0xA5 + 3]


def test_tok512_merges_highest_score_first(tok512):
    """A hand check of the greedy loop on ' the': candidates ' t' (score 0) and 'he' (-1);
    ' t' wins, then ' t'+'he' = ' the'."""
    assert tok512.scores[259] > tok512.scores[260]
    assert [tok512.pieces[i] for i in tok512.encode("the")] == [b" the"]


@pytest.mark.parametrize("text", TEXTS)
def test_tok512_round_trip(tok512, text):
    for bos in (False, True):
        ids = tok512.encode(text, bos=bos)
        assert all(0 <= i < 512 for i in ids)
        assert tok512.decode(ids) == text
    assert tok512.decode(np.array(tok512.encode(text, eos=True), np.int32)) == text


def test_tok512_decode_piece_is_run_c(tok512):
    once = tok512.encode("Once")[0]
    assert tok512.decode_piece(1, once) == b"Once"  # after BOS the leading space goes
    assert tok512.decode_piece(5, once) == b" Once"
    assert tok512.decode_piece(5, 0x41 + 3) == b"A"  # <0x41>
    assert tok512.decode([0xE6 + 3, 0x97]).startswith("\ufffd")  # broken UTF-8 -> U+FFFD
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok512.decode([512])


def test_tok512_decodes_golden_text(tok512, stories):
    golden = (stories / "golden_greedy_t0_steps256.txt").read_text(encoding="utf-8")
    ids = tok512.encode(golden, bos=True)
    assert tok512.decode(ids) == golden
    assert len(ids) < len(golden) / 2  # merges, not bytes


def test_tok512_file_round_trip(tmp_path, tok512, stories):
    tok512.to_file(tmp_path / "tok.bin")
    assert (tmp_path / "tok.bin").read_bytes() == (stories / "tok512.bin").read_bytes()


def test_tok512_as_hugging_face_folder(tmp_path, tok512, stories):
    from transformers import AutoTokenizer

    tok512.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    golden = (stories / "golden_greedy_t0_steps256.txt").read_text(encoding="utf-8")
    for text in [*TEXTS, golden]:
        ids = tok512.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, HFTokenizer) and again.encode("the end", bos=True) == [
        1, *tok512.encode("the end")]


def test_gpt2_files(gpt2):
    assert isinstance(gpt2, HFTokenizer) and isinstance(gpt2, Tokenizer)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (50257, 50256, 50256, -1)
    assert gpt2.encode("Hello world", eos=True) == [15496, 995, 50256]
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text, bos=True, eos=True)) == text


def test_load_tokenizer_dispatch(tmp_path, stories):
    assert isinstance(load_tokenizer(stories / "tok512.bin"), Llama2cTokenizer)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a tokenizer"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tokenizer.bin").write_bytes((stories / "tok512.bin").read_bytes())
    assert isinstance(load_tokenizer(tmp_path / "bin"), Llama2cTokenizer)


# Bad files: a one-line ValueError naming the folder or file (and the line of a merge)


@pytest.fixture()
def hf_folder(tmp_path, tok512):
    folder = tmp_path / "hf"
    tok512.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, tokenizer.bin
    return folder


def _one_line_error(folder, match):
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_model_folder_without_tokenizer_files(tmp_path, hf_folder):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    _one_line_error(model, re.escape(f"{model}: no tokenizer files (has config.json but no "
                                     "tokenizer.json"))
    shutil.copy(hf_folder / "tokenizer_config.json", model)
    _one_line_error(model, re.escape(f"{model}: no tokenizer files (has tokenizer_config.json "
                                     "and config.json"))


def test_corrupt_tokenizer_json(hf_folder):
    path = hf_folder / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    _one_line_error(hf_folder, re.escape(f"{path}: not valid JSON (") + r".*: line \d+ column")
    path.write_text("{}")  # valid JSON, not a tokenizer
    _one_line_error(hf_folder, re.escape(f"{path}: cannot load the tokenizer ("))
    path.write_text("[]")
    _one_line_error(hf_folder, re.escape(f"{path}: expected a JSON object"))


@pytest.fixture()
def gpt2_folder(tmp_path, shared_dir):
    folder = tmp_path / "gpt2"
    shutil.copytree(shared_dir / "models" / "gpt2-tokenizer", folder)
    return folder


@pytest.mark.parametrize(
    "bad, match",
    [
        ("\u0120t he re", r"vocab\.bpe, line 3: expected a merge of 2 tokens .*got 3 fields"),
        ("\u0120t  he", r"vocab\.bpe, line 3: expected a merge of 2 tokens .*got 3 fields"),
        ("zzzzqqq yyyyxxx", r"vocab\.bpe, line 3: token 'zzzzqqq' is not in encoder\.json"),
    ],
    ids=["three-tokens", "two-spaces", "unknown-token"],
)
def test_bad_gpt2_merges(gpt2_folder, bad, match):
    path = gpt2_folder / "vocab.bpe"
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    lines.insert(2, bad)
    path.write_text("\n".join(lines), encoding="utf-8")
    assert _one_line_error(gpt2_folder, match).startswith(str(path))


def test_corrupt_gpt2_encoder(gpt2_folder):
    path = gpt2_folder / "encoder.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(gpt2_folder, re.escape(f"{path}: not valid JSON ("))
    path.write_text('{"a": "zero"}')
    _one_line_error(gpt2_folder, re.escape(f"{path}: expected a JSON object of token -> "
                                           "integer id"))


def _titles(n, seed=0):
    rng = np.random.default_rng(seed)
    adj = ["Dark", "Silent", "Lost", "Golden", "Broken", "Last", "Secret", "Wild", "Café"]
    noun = ["River", "Night", "Empire", "Garden", "Kingdom", "Road", "Storm", "Heart"]
    return [
        f"The {rng.choice(adj)} {rng.choice(noun)} ({1950 + int(rng.integers(0, 70))})"
        for _ in range(n)
    ]


def test_train_bpe_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = _titles(400)
    tok = train_bpe_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "bpe")
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 300
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"), local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    reloaded = load_tokenizer(tmp_path / "bpe")
    for text in [*texts[:20], "an unseen title: Ünïcode ☃", ""]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert reloaded.encode(text, bos=True, eos=True) == ids
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert reloaded.decode(ids) == text
    # merges were learnt: a title takes fewer tokens than bytes
    assert len(tok.encode(texts[0])) < len(texts[0].encode())


def test_train_bpe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="must be distinct"):
        train_bpe_tokenizer(["a b"], vocab_size=300, special_tokens=("<s>", "<s>", "</s>"))


def test_data_never_imports_jax(shared_dir):
    code = (
        "import sys, jaxrec.data as d\n"
        "assert 'jax' not in sys.modules\n"
        f"d.load_tokenizer({str(shared_dir / 'models' / 'gpt2-tokenizer')!r}).encode('hi')\n"
        f"d.load_tokenizer({str(shared_dir / 'models' / 'stories260K' / 'tok512.bin')!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
