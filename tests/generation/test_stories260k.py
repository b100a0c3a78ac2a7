"""End to end on a real pretrained model: stories260K (llama2.c) reproduces its golden output."""

import jax
import numpy as np

from jaxrec.cli import main
from jaxrec.data import load_tokenizer
from jaxrec.generation import Greedy, generate_jit, left_pad
from jaxrec.models import load_pretrained


def test_greedy_from_bos_reproduces_the_golden_text(shared_dir):
    folder = shared_dir / "models" / "stories260K"
    golden = (folder / "golden_greedy_t0_steps256.txt").read_text().rstrip("\n")
    cfg, params = load_pretrained(folder / "stories260K.bin")
    tokenizer = load_tokenizer(folder / "tok512.bin")
    prompt, valid = left_pad([[tokenizer.bos_id]])
    # llama2.c's `run -t 0 -n 256` runs 256 forward passes from BOS: 256 new tokens.
    out = generate_jit(cfg, params, prompt, valid, jax.random.key(0), sampler=Greedy(),
                       max_new_tokens=256)
    ids = [int(t) for t in np.asarray(out.tokens[0])[np.asarray(out.mask[0])]]
    assert len(ids) == 256
    assert tokenizer.decode([tokenizer.bos_id] + ids) == golden


def test_cli_generate_prints_the_golden_text(shared_dir, capsys):
    folder = shared_dir / "models" / "stories260K"
    golden = (folder / "golden_greedy_t0_steps256.txt").read_text().rstrip("\n")
    status = main(["generate", "--model", str(folder / "stories260K.bin"), "--greedy",
                   "--max-new-tokens", "256"])
    assert status == 0
    assert capsys.readouterr().out.rstrip("\n") == golden


def test_cli_generate_reports_a_missing_model_in_one_line(tmp_path, capsys):
    status = main(["generate", "--model", str(tmp_path / "nope.bin"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "nope.bin" in err
