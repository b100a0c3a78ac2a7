"""Write the results tables of the docs from `jaxrec eval` outputs, never by hand.

    python docs/results_table.py FILE MARKER RUN_DIR [RUN_DIR ...]

replaces the lines between `<!-- MARKER:start -->` and `<!-- MARKER:end -->` in FILE with the
summary table of the runs' `eval/results.json` (one run per seed of the same config; the LM
policies' rows become the mean and 95% interval over them, see
`jaxrec.train.evaluate.combine_runs`).
"""

import json
import pathlib
import sys

from jaxrec.train.evaluate import combine_runs, summary_table


def main(file: str, marker: str, *runs: str) -> None:
    results = combine_runs([json.loads((pathlib.Path(r) / "eval" / "results.json").read_text())
                            for r in runs])
    path = pathlib.Path(file)
    text = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{file}: no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{summary_table(results)}{end}{tail}")


if __name__ == "__main__":
    main(*sys.argv[1:])
