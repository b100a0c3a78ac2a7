"""`jaxrec recommend`: the top-K catalogue items a trained policy gives a history of titles.

    recommend_titles(workdir, ["Toy Story", "Heat (1995)"], k=10)
    -> [{"rank": 1, "item": 49, "title": "Star Wars", "year": 1977, "score": -3.2}, ...]

Full-catalogue scoring (`jaxrec.eval.offline.recommend`): every item's log-probability as the
first item of a slate after the prompt; history items excluded; K distinct valid items.
"""

from __future__ import annotations

import difflib
import pathlib
import re

from jaxrec.config import load_config
from jaxrec.train.setup import Setup, build_setup

_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _labels(setup: Setup) -> list[str]:
    years = setup.years or [None] * len(setup.titles)
    return [t if y is None else f"{t} ({y})" for t, y in zip(setup.titles, years, strict=True)]


def items_of_titles(setup: Setup, titles: list[str]) -> list[int]:
    """Catalogue indices of titles, matched case-insensitively ("Title" or "Title (Year)").

    An unknown or ambiguous title is a one-line error with the closest catalogue titles."""
    labels = _labels(setup)
    by_label = {label.casefold(): i for i, label in enumerate(labels)}
    by_title: dict[str, list[int]] = {}
    for i, title in enumerate(setup.titles):
        by_title.setdefault(title.casefold(), []).append(i)
    items = []
    for raw in titles:
        text = raw.strip()
        if text.casefold() in by_label:
            items.append(by_label[text.casefold()])
            continue
        match = by_title.get(text.casefold(), [])
        if len(match) == 1:
            items.append(match[0])
            continue
        if len(match) > 1:
            options = "; ".join(labels[i] for i in match)
            raise ValueError(f"--history title {text!r} is ambiguous: add the year ({options})")
        close = difflib.get_close_matches(text, labels, n=3, cutoff=0.5)
        hint = f"; closest: {'; '.join(close)}" if close else ""
        raise ValueError(f"--history title {text!r} is not in the catalogue{hint}")
    return items


def recommend_titles(workdir, history: list[str], k: int = 10,
                     stage: str | None = None) -> list[dict]:
    """The policy's top-k items for a history of titles (oldest first)."""
    from jaxrec.eval.offline import recommend
    from jaxrec.train.export import _latest_policy

    workdir = pathlib.Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise FileNotFoundError(f"{workdir}/config.yaml is missing: not a jaxrec work dir")
    if k < 1:
        raise ValueError(f"-k {k} must be >= 1")
    config = load_config(workdir / "config.yaml")
    setup = build_setup(config)
    items = items_of_titles(setup, history)
    _, params = _latest_policy(workdir, config, setup, stage)
    top = recommend(setup.model, params, setup.codec, items, k, setup.spec.prompt_len,
                    setup.spec.slate_size)
    years = setup.years or [None] * len(setup.titles)
    return [{"rank": r + 1, "item": i, "title": setup.titles[i], "year": years[i],
             "score": score} for r, (i, score) in enumerate(top)]


def split_history(text: str) -> list[str]:
    """'title; title; ...' -> titles (empty parts dropped)."""
    return [part.strip() for part in text.split(";") if part.strip()]
