"""MovieLens from the raw GroupLens files, and the one entry point for MovieLens.

    ratings = load_movielens("movielens-100k", data_dir="~/data")   # reads ~/data/ml-100k/
    ratings = load_movielens("movielens-latest-small", tfds_dir="~/tensorflow_datasets")

Host-side only (numpy and the standard library); jax is never imported, and
tensorflow-datasets only inside `jaxrec.data.movielens_tfds`, lazily.

Formats read (the layout GroupLens publishes, which tensorflow-datasets also unzips):
- ml-100k: `u.data` (tab-separated user, item, rating, timestamp), `u.item` ('|'-separated,
  ISO-8859-1: id, title, release date, video date, IMDb URL, then one 0/1 flag per genre),
  `u.genre` (the flag names, 'name|index'; the documented order when absent), `u.user`
  (id|age|gender|occupation|zip).
- ml-1m: `ratings.dat`, `movies.dat` (id::title::genre|genre), `users.dat`
  (id::gender::age::occupation-code::zip), all '::'-separated ISO-8859-1.
- ml-latest-small, ml-20m, ml-25m: UTF-8 CSV `ratings.csv` (userId,movieId,rating,timestamp)
  and `movies.csv` (movieId,title,genres; titles with commas are quoted, genres '|'-separated).

Genre names follow tensorflow-datasets ("Children's" is "Children", "unknown" is "Unknown"),
so every source shares one genre vocabulary, `GENRES`. A row that cannot be read is a
ValueError naming the file, the 1-based line and the reason; with `lenient=True` it is skipped
and counted on the result (`Ratings.skipped`, with the first reasons in `skipped_notes`), and so
are the ratings of a movie or user whose own row was skipped. A missing folder or file is a
FileNotFoundError naming what was expected there. Readers only read: nothing is written.
"""

from __future__ import annotations

import csv
import os
import pathlib
import re
from array import array
from collections.abc import Iterator

import numpy as np

from jaxrec.data.ratings import Items, Ratings, Users, make_ratings

# source -> (folder name, tensorflow-datasets format name)
SOURCES = {
    "movielens-100k": ("ml-100k", "100k"),
    "movielens-1m": ("ml-1m", "1m"),
    "movielens-latest-small": ("ml-latest-small", "latest-small"),
    "movielens-20m": ("ml-20m", "20m"),
    "movielens-25m": ("ml-25m", "25m"),
}

# The genre vocabulary, in tensorflow-datasets' ClassLabel order (genres outside it are
# appended, sorted, after these).
GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "Unknown", "War", "Western", "(no genres listed)",
)  # fmt: skip
_GENRE_ALIASES = {"Children's": "Children", "unknown": "Unknown"}
# u.item's 19 flag columns, in u.genre order (used when u.genre is absent)
_GENRES_100K = (
    "Unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
# users.dat occupation codes 0..20 (ml-1m README), named as tensorflow-datasets names them
OCCUPATIONS_1M = (
    "other/not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer",
)  # fmt: skip

# the files each layout needs (ratings, movies) and may have (users)
_FILES = {
    "100k": (("u.data", "u.item"), "u.user"),
    "1m": (("ratings.dat", "movies.dat"), "users.dat"),
    "csv": (("ratings.csv", "movies.csv"), None),
}
_LATIN1 = "iso-8859-1"
_MAX_NOTES = 10
# "(1995)", "(2006–2007)", "(2007-)": the release year and an optional end year
_YEAR = re.compile(r"\((\d{4})(?:\s*[-–]\s*(?:\d{4})?)?\)")


def parse_title(title: str) -> tuple[str, int]:
    """(title without its year, year) for a MovieLens title; year is -1 when there is none.

    The year is the last "(YYYY)" (or "(YYYY–YYYY)") group; anything after it, such as "(V)",
    stays: "Land Before Time III: ... (1995) (V)" -> ("Land Before Time III: ... (V)", 1995).
    Alternative titles in parentheses stay too.
    """
    title = title.strip()
    matches = list(_YEAR.finditer(title))
    if not matches:
        return title, -1
    match = matches[-1]
    head, tail = title[: match.start()].rstrip(), title[match.end() :].lstrip()
    return (f"{head} {tail}" if head and tail else head or tail), int(match.group(1))


def make_items(movies: dict[int, tuple[str, tuple[str, ...]]]) -> Items:
    """Items from {movie id: (title, genre names)}, sorted by id; genre columns are `GENRES`
    then any other names, sorted."""
    ids = np.array(sorted(movies), np.int64)
    extra = sorted({g for _, gs in movies.values() for g in gs} - set(GENRES))
    names = GENRES + tuple(extra)
    column = {g: j for j, g in enumerate(names)}
    genres = np.zeros((len(ids), len(names)), bool)
    titles, clean, years = [], [], []
    for i, movie_id in enumerate(ids.tolist()):
        title, movie_genres = movies[movie_id]
        genres[i, [column[g] for g in movie_genres]] = True
        clean_title, year = parse_title(title)
        titles.append(title.strip())
        clean.append(clean_title)
        years.append(year)
    return Items(
        ids=ids,
        title=np.array(titles, dtype=str),
        clean_title=np.array(clean, dtype=str),
        year=np.array(years, np.int32),
        genres=genres,
        genre_names=names,
    )


def make_users(users: dict[int, tuple[str, int, str, str]]) -> Users:
    """Users from {user id: (gender, age, occupation, zip code)}, sorted by id."""
    ids = sorted(users)
    rows = [users[u] for u in ids]
    return Users(
        ids=np.array(ids, np.int64),
        gender=np.array([r[0] for r in rows], dtype=str),
        age=np.array([r[1] for r in rows], np.int32),
        occupation=np.array([r[2] for r in rows], dtype=str),
        zip_code=np.array([r[3] for r in rows], dtype=str),
    )


# ---------------------------------------------------------------------------------------------
# Line-level reading with file/line errors


class _Issues:
    """Malformed rows: a ValueError naming file and line, or (lenient) a count and notes."""

    def __init__(self, lenient: bool):
        self.lenient = lenient
        self.skipped = 0
        self.notes: list[str] = []

    def bad(self, path: pathlib.Path, lineno: int, why: str) -> None:
        message = f"{path}, line {lineno}: {why}"
        if not self.lenient:
            raise ValueError(message)
        self.skipped += 1
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(message)


def _show(text: str, limit: int = 80) -> str:
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _lines(path: pathlib.Path, encoding: str, issues: _Issues) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line ending) of each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                issues.bad(path, lineno, f"not {encoding} text ({err.reason} at byte {err.start})")
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield lineno, text


def _csv_rows(
    path: pathlib.Path, header: tuple[str, ...], issues: _Issues
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record after a header that must equal `header`."""
    where = [0]

    def lines():
        for lineno, text in _lines(path, "utf-8", issues):
            where[0] = lineno
            yield text + "\n"

    reader = csv.reader(lines(), strict=True)
    try:
        first = next(reader, None)
        if first is None or tuple(first) != header:
            got = "nothing" if first is None else repr(",".join(first))
            raise ValueError(f"{path}, line 1: expected the header {','.join(header)!r}, got {got}")
        for fields in reader:
            yield where[0], fields
    except csv.Error as err:
        raise ValueError(f"{path}, line {where[0]}: {err}") from None


def _split_rows(
    path: pathlib.Path, sep: str, n: int, issues: _Issues, encoding: str = _LATIN1
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each line with exactly `n` fields separated by `sep`."""
    for lineno, text in _lines(path, encoding, issues):
        fields = text.strip().split(sep)
        if len(fields) != n:
            why = f"expected {n} fields separated by {sep!r}, got {len(fields)}: {_show(text)}"
            issues.bad(path, lineno, why)
            continue
        yield lineno, fields


def _int(text: str, what: str, bits: int = 64) -> int:
    """An integer field that fits a signed `bits`-bit integer (the column it goes into)."""
    try:
        value = int(text)
    except ValueError:  # also a number of more than sys.get_int_max_str_digits() digits
        raise ValueError(f"{what} {_show(text)} is not an integer") from None
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise ValueError(f"{what} {_show(text)} is outside the int{bits} range")
    return value


# ---------------------------------------------------------------------------------------------
# Movies, users and ratings per layout


def _genre_names_100k(folder: pathlib.Path, issues: _Issues) -> tuple[str, ...]:
    path = folder / "u.genre"
    if not path.is_file():
        return _GENRES_100K
    names: dict[int, str] = {}
    for lineno, (name, index) in _split_rows(path, "|", 2, issues):
        try:
            index = _int(index, "genre index")
            if index in names:
                raise ValueError(f"genre index {index} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        names[index] = _GENRE_ALIASES.get(name, name)
    if not names:  # else every u.item row would be blamed for its genre flags
        raise ValueError(f"{path}: lists no genres (expected 'name|index' lines)")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: genre indices are not 0..{len(names) - 1}: {sorted(names)}")
    return tuple(names[i] for i in range(len(names)))


def _movies_100k(folder: pathlib.Path, issues: _Issues) -> dict:
    genre_names = _genre_names_100k(folder, issues)
    path = folder / "u.item"
    movies: dict[int, tuple[str, tuple[str, ...]]] = {}
    for lineno, fields in _split_rows(path, "|", 5 + len(genre_names), issues):
        try:
            movie_id = _int(fields[0], "movie id")
            flags = fields[5:]
            if any(f not in ("0", "1") for f in flags):
                raise ValueError(f"genre flags must be 0 or 1, got {'|'.join(flags)!r}")
            if movie_id in movies:
                raise ValueError(f"movie id {movie_id} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        genres = tuple(g for g, f in zip(genre_names, flags, strict=True) if f == "1")
        movies[movie_id] = (fields[1], genres)
    return movies


def _movies_1m(folder: pathlib.Path, issues: _Issues) -> dict:
    path = folder / "movies.dat"
    movies: dict[int, tuple[str, tuple[str, ...]]] = {}
    for lineno, (movie_id, title, genres) in _split_rows(path, "::", 3, issues):
        try:
            movie_id = _int(movie_id, "movie id")
            if movie_id in movies:
                raise ValueError(f"movie id {movie_id} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        movies[movie_id] = (title, tuple(_GENRE_ALIASES.get(g, g) for g in genres.split("|")))
    return movies


def _movies_csv(folder: pathlib.Path, issues: _Issues) -> dict:
    path = folder / "movies.csv"
    movies: dict[int, tuple[str, tuple[str, ...]]] = {}
    for lineno, fields in _csv_rows(path, ("movieId", "title", "genres"), issues):
        try:
            if len(fields) != 3:
                raise ValueError(f"expected 3 fields (movieId,title,genres), got {len(fields)}")
            movie_id = _int(fields[0], "movieId")
            if movie_id in movies:
                raise ValueError(f"movieId {movie_id} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        genres = tuple(_GENRE_ALIASES.get(g, g) for g in fields[2].split("|"))
        movies[movie_id] = (fields[1], genres)
    return movies


def _users_100k(path: pathlib.Path, issues: _Issues) -> dict:
    users: dict[int, tuple[str, int, str, str]] = {}
    for lineno, (user_id, age, gender, occupation, zip_code) in _split_rows(path, "|", 5, issues):
        try:
            user_id, age = _int(user_id, "user id"), _int(age, "age", bits=32)
            if gender not in ("M", "F"):
                raise ValueError(f"gender must be M or F, got {gender!r}")
            if user_id in users:
                raise ValueError(f"user id {user_id} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        users[user_id] = (gender, age, occupation, zip_code)
    return users


def _users_1m(path: pathlib.Path, issues: _Issues) -> dict:
    users: dict[int, tuple[str, int, str, str]] = {}
    for lineno, (user_id, gender, age, code, zip_code) in _split_rows(path, "::", 5, issues):
        try:
            user_id, age = _int(user_id, "user id"), _int(age, "age", bits=32)
            code = _int(code, "occupation code")
            if not 0 <= code < len(OCCUPATIONS_1M):
                raise ValueError(f"occupation code {code} is outside 0..{len(OCCUPATIONS_1M) - 1}")
            if gender not in ("M", "F"):
                raise ValueError(f"gender must be M or F, got {gender!r}")
            if user_id in users:
                raise ValueError(f"user id {user_id} is listed twice")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        users[user_id] = (gender, age, OCCUPATIONS_1M[code], zip_code)
    return users


def _ratings_by_row(
    path: pathlib.Path,
    layout: str,
    movies: dict,
    users: dict | None,
    issues: _Issues,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, movie ids, ratings, timestamps) of a ratings file, each row checked: four
    integer/number fields, a rating in [0.5, 5], a listed movie, and a listed user (when the
    data set lists users). A failed check is `issues.bad(file, line, why)`."""
    if layout == "csv":
        rows = _csv_rows(path, ("userId", "movieId", "rating", "timestamp"), issues)
    else:
        rows = _split_rows(path, "\t" if layout == "100k" else "::", 4, issues)
    # typed arrays, not lists: ml-25m has 25M rows
    user_ids, movie_ids, stars, times = array("q"), array("q"), array("f"), array("q")
    movies_file = _FILES[layout][0][1]
    users_file = _FILES[layout][1]
    for lineno, fields in rows:
        try:
            if len(fields) != 4:  # csv rows; split rows have 4 already
                raise ValueError(f"expected 4 fields, got {len(fields)}")
            user_id = _int(fields[0], "user id")
            movie_id = _int(fields[1], "movie id")
            try:
                rating = float(fields[2])
            except ValueError:
                raise ValueError(f"rating {fields[2]!r} is not a number") from None
            timestamp = _int(fields[3], "timestamp")
            if not 0.5 <= rating <= 5.0:
                raise ValueError(f"rating {fields[2]} is outside [0.5, 5]")
            if movie_id not in movies:
                raise ValueError(f"movie id {movie_id} is not in {movies_file}")
            if users is not None and user_id not in users:
                raise ValueError(f"user id {user_id} is not in {users_file}")
        except ValueError as err:
            issues.bad(path, lineno, str(err))
            continue
        user_ids.append(user_id)
        movie_ids.append(movie_id)
        stars.append(rating)
        times.append(timestamp)
    return (
        np.frombuffer(user_ids, np.int64),
        np.frombuffer(movie_ids, np.int64),
        np.frombuffer(stars, np.float32),
        np.frombuffer(times, np.int64),
    )


_RATINGS_HEADER = b"userId,movieId,rating,timestamp"
_SEPARATORS = {"100k": b"\t", "1m": b"::", "csv": b","}
_CHUNK = 1 << 24  # bytes per bulk-parsed chunk: bounded memory on ml-25m
_LINE = np.frombuffer(b",,,\n", np.uint8)  # the separators of one clean line, in order


def _bulk_parse(chunk: bytes, sep: bytes) -> np.ndarray | None:
    """[L, 4] float64 values of whole lines `int SEP int SEP number SEP int` written with plain
    decimal digits (ids and timestamps of at most 15 digits, so exact in float64), or None
    when any line is not of that form."""
    if sep != b"," and b"," in chunk:
        return None
    chunk = chunk.replace(sep, b",")
    if b"\r" in chunk:
        if chunk.count(b"\r") != chunk.count(b"\r\n"):
            return None
        chunk = chunk.replace(b"\r\n", b"\n")
    if chunk.translate(None, b"0123456789.,\n"):
        return None  # a byte a clean line cannot have
    arr = np.frombuffer(chunk, np.uint8)
    seps = np.flatnonzero((arr == ord(",")) | (arr == ord("\n")))  # [4L]
    if len(seps) % 4 or not np.all(arr[seps].reshape(-1, 4) == _LINE):
        return None  # some line has other than 4 fields
    width = np.diff(seps, prepend=-1) - 1  # [4L] characters per field
    if len(width) and (width.min() < 1 or width.max() > 15):
        return None
    field = np.searchsorted(seps, np.flatnonzero(arr == ord(".")))  # field of each "."
    if np.any(field % 4 != 2) or np.any(width[field] < 2) or np.any(np.diff(field) == 0):
        return None  # a "." outside the rating, alone, or twice in it
    values = np.fromstring(chunk.replace(b",", b" ").decode("ascii"), np.float64, sep=" ")
    return values.reshape(-1, 4) if len(values) == len(seps) else None


def _ratings_fast(
    path: pathlib.Path, layout: str, movies: dict, users: dict | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The columns of a clean ratings file, parsed in bulk by numpy; None when any line needs
    the row-by-row reader (to name it, or to skip it). Only lines that reader would take as
    they are get through here, so both give the same columns."""
    blocks = []
    with open(path, "rb") as f:
        if layout == "csv" and f.readline().rstrip(b"\r\n") != _RATINGS_HEADER:
            return None
        while chunk := f.read(_CHUNK):
            chunk += f.readline()  # up to the end of the line
            chunk += b"" if chunk.endswith(b"\n") else b"\n"
            block = _bulk_parse(chunk, _SEPARATORS[layout])
            if block is None:
                return None
            blocks.append(block)
    values = np.concatenate(blocks) if blocks else np.zeros((0, 4))
    user_ids, movie_ids = values[:, 0].astype(np.int64), values[:, 1].astype(np.int64)
    stars, times = values[:, 2].astype(np.float32), values[:, 3].astype(np.int64)
    if not np.all((stars >= 0.5) & (stars <= 5.0)):
        return None
    if not np.all(np.isin(movie_ids, np.fromiter(movies, np.int64, len(movies)))):
        return None
    if users is not None and not np.all(np.isin(user_ids, np.fromiter(users, np.int64))):
        return None
    return user_ids, movie_ids, stars, times


def _ratings(
    path: pathlib.Path, layout: str, movies: dict, users: dict | None, issues: _Issues
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, movie ids, ratings, timestamps) of a ratings file: in bulk when every line is
    clean, else row by row with file/line errors (or skips, when lenient)."""
    fast = _ratings_fast(path, layout, movies, users)
    return fast if fast is not None else _ratings_by_row(path, layout, movies, users, issues)


def _check_source(source: str) -> tuple[str, str]:
    if source not in SOURCES:
        raise ValueError(f"unknown MovieLens source {source!r}; expected one of {list(SOURCES)}")
    return SOURCES[source]


def _folder(source: str, data_dir: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """The folder holding `source`'s files (data_dir/ml-100k, or data_dir itself) and layout."""
    name, fmt = _check_source(source)
    layout = fmt if fmt in ("100k", "1m") else "csv"
    needed, _ = _FILES[layout]
    expected = f"{name}/ holding {', '.join(needed)}"
    root = pathlib.Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{source}: data_dir {root} is not a folder (expected {expected})")
    folder = root / name
    if not folder.is_dir():
        if not all((root / f).is_file() for f in needed):
            raise FileNotFoundError(f"{source}: no folder {folder} (expected {expected})")
        folder = root  # data_dir is the data set's own folder
    for f in needed:
        if not (folder / f).is_file():
            raise FileNotFoundError(
                f"{source}: {folder} has no {f} (expected {', '.join(needed)} there)"
            )
    return folder, layout


def _read_movies(folder: pathlib.Path, layout: str, issues: _Issues) -> dict:
    return {"100k": _movies_100k, "1m": _movies_1m, "csv": _movies_csv}[layout](folder, issues)


def read_movielens_items(
    source: str, data_dir: str | os.PathLike, *, lenient: bool = False
) -> Items:
    """Every movie the movie file lists (rated or not), sorted by id: the whole catalogue.

    `load_movielens(...).items` holds only the rated movies, aligned to the dense item index.
    """
    folder, layout = _folder(source, data_dir)
    return make_items(_read_movies(folder, layout, _Issues(lenient)))


def read_movielens_raw(
    source: str, data_dir: str | os.PathLike, *, lenient: bool = False
) -> Ratings:
    """The Ratings table of `source` from its raw files in `data_dir/<ml-folder>/` (or in
    `data_dir` itself). See the module docstring for formats and error handling."""
    folder, layout = _folder(source, data_dir)
    issues = _Issues(lenient)
    movies = _read_movies(folder, layout, issues)
    users = None
    users_file = _FILES[layout][1]
    if users_file is not None and (folder / users_file).is_file():
        read_users = _users_100k if layout == "100k" else _users_1m
        users = read_users(folder / users_file, issues)
    ratings_file = _FILES[layout][0][0]
    columns = _ratings(folder / ratings_file, layout, movies, users, issues)
    return make_ratings(
        *columns,
        make_items(movies),
        None if users is None else make_users(users),
        source=source,
        skipped=issues.skipped,
        skipped_notes=issues.notes,
    )


def load_movielens(
    source: str,
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    *,
    lenient: bool = False,
    download: bool = False,
) -> Ratings:
    """MovieLens `source` as one Ratings table (with item texts, and user demographics where the
    data set has them).

    Args:
      source: one of `SOURCES`: movielens-100k, -1m, -latest-small, -20m, -25m.
      data_dir: a folder holding the unzipped GroupLens folder (e.g. `ml-100k/`): read the raw
        files. Without it, read through tensorflow-datasets.
      tfds_dir: the tensorflow-datasets data_dir (default: tensorflow-datasets' own,
        ~/tensorflow_datasets); the `<format>-ratings` config must be prepared there, or
        `download=True`.
      lenient: raw files only: skip malformed rows and count them (`Ratings.skipped`) instead
        of raising ValueError naming the file and line.
      download: tensorflow-datasets only: download and prepare the config if it is not there.
    """
    _, fmt = _check_source(source)
    if data_dir is not None:
        if tfds_dir is not None:
            raise ValueError(
                "give data_dir (raw files) or tfds_dir (tensorflow-datasets), not both"
            )
        return read_movielens_raw(source, data_dir, lenient=lenient)
    from jaxrec.data.movielens_tfds import load_movielens_tfds

    return load_movielens_tfds(f"{fmt}-ratings", tfds_dir, download=download)
