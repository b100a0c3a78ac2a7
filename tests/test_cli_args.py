"""The `jaxrec` command line refuses bad arguments with one line (exit status 2)."""

import shutil
import struct

import pytest

from jaxrec import cli
from jaxrec.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _write_llama2c_tokenizer(path, n: int) -> None:
    """A llama2.c tokenizer.bin of n made-up pieces."""
    pieces = [b"<%d>" % i for i in range(n)]
    body = b"".join(struct.pack("<fi", 0.0, len(p)) + p for p in pieces)
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + body)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (["--max-new-tokens", "-3"], "--max-new-tokens -3 must be >= 1"),
        (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--top-p", "nan"], "--top-p nan must be in (0, 1]"),
        (["--top-k", "-2"], "--top-k -2 must be >= 0"),
    ],
)
def test_generate_refuses_bad_sampling_arguments(tmp_path, capsys, flags, message):
    model = tmp_path / "model.bin"
    model.write_bytes(b"")  # never read: the arguments are checked first
    assert main(["generate", "--model", str(model), "--prompt", "hi", *flags]) == 2
    assert message in _one_line_error(capsys)


def test_find_tokenizer_prefers_the_one_named_after_the_vocab_size(tmp_path):
    model = tmp_path / "stories260K.bin"
    for name in ("stories260K.bin", "tok4096.bin", "tok512.bin"):
        (tmp_path / name).write_bytes(b"")
    assert cli._find_tokenizer(model, vocab_size=512) == tmp_path / "tok512.bin"
    assert cli._find_tokenizer(model, vocab_size=4096) == tmp_path / "tok4096.bin"
    assert cli._find_tokenizer(model) == tmp_path / "tok4096.bin"  # unknown size: sorted
    (tmp_path / "tokenizer.bin").write_bytes(b"")
    assert cli._find_tokenizer(model, vocab_size=512) == tmp_path / "tok512.bin"
    assert cli._find_tokenizer(model, vocab_size=32000) == tmp_path / "tokenizer.bin"


def test_generate_picks_the_matching_tokenizer_of_two(shared_dir, tmp_path, capsys):
    folder = shared_dir / "models" / "stories260K"
    golden = (folder / "golden_greedy_t0_steps256.txt").read_text()
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(folder / name, tmp_path / name)
    _write_llama2c_tokenizer(tmp_path / "tok4096.bin", 4096)  # sorts before tok512.bin
    status = main(["generate", "--model", str(tmp_path / "stories260K.bin"), "--greedy",
                   "--max-new-tokens", "16"])
    out = capsys.readouterr().out.rstrip("\n")
    assert status == 0 and len(out) > 20 and golden.startswith(out)


def test_generate_refuses_a_tokenizer_larger_than_the_model_vocab(shared_dir, tmp_path, capsys):
    model = shared_dir / "models" / "stories260K" / "stories260K.bin"
    gpt2 = shared_dir / "models" / "gpt2-tokenizer"
    assert main(["generate", "--model", str(model), "--tokenizer", str(gpt2)]) == 2
    err = _one_line_error(capsys)
    assert "50257" in err and "512" in err and str(gpt2) in err and str(model) in err

    shutil.copy(model, tmp_path / "stories260K.bin")
    _write_llama2c_tokenizer(tmp_path / "tok4096.bin", 4096)  # the only one beside it
    assert main(["generate", "--model", str(tmp_path / "stories260K.bin")]) == 2
    err = _one_line_error(capsys)
    assert "tok4096.bin has 4096 tokens" in err and "vocabulary of 512" in err


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["export", "--workdir", "run", "--out", "gs://bucket/x"], "--out gs://bucket/x"),
        (["export", "--workdir", "gs://bucket/run", "--out", "out"], "--workdir gs://bucket/run"),
        (["eval", "--workdir", "gs://bucket/run"], "--workdir gs://bucket/run"),
        (["recommend", "--workdir", "s3://b/run", "--history", "x"], "--workdir s3://b/run"),
        (["plot", "--workdir", "gs://bucket/run"], "--workdir gs://bucket/run"),
        (["train", "--workdir", "gs://bucket/run"], "--workdir gs://bucket/run"),
        (["ppo", "--workdir", "gs://bucket/run"], "--workdir gs://bucket/run"),
    ],
)
def test_urls_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"{flag}: a URL; give a local or mounted path" in err
    assert list(tmp_path.iterdir()) == []  # no ./gs:/bucket/x folder


def test_floating_point_errors_are_one_line(monkeypatch, capsys):
    import jaxrec.train.report

    def refuse(workdir, stage):
        raise FloatingPointError("refusing to checkpoint step 3: params is not finite")

    monkeypatch.setattr(jaxrec.train.report, "write_plots", refuse)
    assert main(["plot", "--workdir", "run"]) == 2
    err = _one_line_error(capsys)
    assert err == "jaxrec plot: error: refusing to checkpoint step 3: params is not finite"
