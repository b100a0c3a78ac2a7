"""MovieLens through tensorflow-datasets (`movielens/<format>-ratings`), into the same Ratings
table as the raw-file reader.

tensorflow-datasets is imported inside the functions, never at module level, and tensorflow
is never needed to read: prepared records are tf.train.Example protos, read straight from the
array_record shards (with the array_record package) or TFRecord shards (framing read here),
and decoded with the proto classes tensorflow-datasets ships. Preparing is tensorflow-datasets'
job: with `download=True` it is asked for the array_record format. Known limits of
tensorflow-datasets 4.9.10 without tensorflow: it cannot extract the downloaded zip (its
extractor calls tensorflow), nor parse the 100k and 1m files (its parser opens them with
tf.io.gfile); latest-small, 20m and 25m prepare without tensorflow once the zip is extracted.
Data prepared elsewhere (any machine, tfrecord or array_record) is read from `data_dir`.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxrec.data.movielens import SOURCES, make_items, make_users
from jaxrec.data.ratings import Ratings, make_ratings

# tensorflow-datasets config name -> our source name
TFDS_CONFIGS = {f"{fmt}-ratings": source for source, (_, fmt) in SOURCES.items()}
_NEEDS_TF = ("100k-ratings", "1m-ratings")  # their tfds parser opens files with tf.io.gfile


def _config_name(config: str) -> str:
    name = config.removeprefix("movielens/")
    if name not in TFDS_CONFIGS:
        raise ValueError(
            f"unknown MovieLens config {config!r}; expected one of {list(TFDS_CONFIGS)} "
            "(the '-movies' configs have no ratings)"
        )
    return name


def _import_tfds():
    """tensorflow_datasets with its movielens builder registered, or a one-line ImportError."""
    try:
        import tensorflow_datasets as tfds
        import tensorflow_datasets.structured.movielens  # noqa: F401  (registers the builder)
    except ImportError as err:
        raise ImportError(
            f"reading MovieLens through tensorflow-datasets needs tensorflow-datasets and "
            f"importlib_resources ({err}): pip install 'jaxrec[tfds]', or read the raw files "
            f"with load_movielens(source, data_dir=...)"
        ) from err
    return tfds


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def load_movielens_tfds(
    config: str = "latest-small-ratings",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    manual_dir: str | os.PathLike | None = None,
) -> Ratings:
    """MovieLens ratings from tensorflow-datasets' `movielens/<config>` as one Ratings table.

    Args:
      config: "100k-ratings", "1m-ratings", "latest-small-ratings", "20m-ratings" or
        "25m-ratings" (a "movielens/" prefix is accepted).
      data_dir: tensorflow-datasets' data_dir (None: its default, ~/tensorflow_datasets).
      download: when the config is not prepared there, download and prepare it (array_record
        format); otherwise a missing config is a FileNotFoundError.
      manual_dir: a folder holding `ml-<format>.zip` as GroupLens publishes it, used instead
        of downloading (tensorflow-datasets still checks its checksum).

    Errors are one line: ImportError without tensorflow-datasets, FileNotFoundError when the
    config is not prepared and download is off, RuntimeError when it cannot be downloaded or
    prepared (with the reason tensorflow-datasets gave).
    """
    name = _config_name(config)
    tfds = _import_tfds()
    try:
        builder = tfds.builder(f"movielens/{name}", data_dir=data_dir)
    except Exception as err:
        raise RuntimeError(
            f"tensorflow-datasets could not make movielens/{name} in {data_dir}: "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err
    if not builder.is_prepared():
        where = builder.data_dir
        if not download:
            raise FileNotFoundError(
                f"movielens/{name} is not prepared in {where}: pass download=True, or prepare it "
                f"elsewhere (tfds build movielens/{name}) and pass that data_dir"
            )
        _prepare(tfds, builder, name, manual_dir)
    return read_prepared(builder, TFDS_CONFIGS[name])


def _prepare(tfds, builder, name: str, manual_dir) -> None:
    """Download and prepare `builder` as array_record; failures become one RuntimeError line."""
    hint = (
        " (tensorflow-datasets needs tensorflow to extract the zip and to parse 100k/1m: "
        "pip install 'jaxrec[tf]', or read the raw files with load_movielens(source, data_dir=...))"
    )
    if name in _NEEDS_TF and importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(f"cannot prepare movielens/{name} without tensorflow{hint}")
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir),
        try_download_gcs=False,  # build from the GroupLens zip, checked against its checksum
    )
    try:
        builder.download_and_prepare(file_format="array_record", download_config=config)
    except Exception as err:
        reason = f"{type(err).__name__}: {_first_line(err)}"
        raise RuntimeError(
            f"could not download and prepare movielens/{name} in {builder.data_dir}: {reason}"
            f"{hint if 'tensorflow' in reason.lower() else ''}"
        ) from err


# ---------------------------------------------------------------------------------------------
# Reading prepared shards without tensorflow


def read_prepared(builder, source: str) -> Ratings:
    """The Ratings table of a prepared tensorflow-datasets movielens `*-ratings` builder."""
    info = builder.info
    file_format = getattr(info.file_format, "value", info.file_format)
    paths = [os.fspath(p) for p in info.splits["train"].filepaths]
    if file_format == "array_record":
        records = _array_record_records(paths)
    elif file_format == "tfrecord":
        records = _tfrecord_records(paths)
    else:
        raise ValueError(
            f"{builder.data_dir}: cannot read the {file_format!r} format; prepare it as "
            "array_record or tfrecord"
        )
    genre_names = info.features["movie_genres"].feature.names
    return ratings_from_examples(records, genre_names, source)


def _array_record_records(paths: Sequence[str]) -> Iterator[bytes]:
    from array_record.python import array_record_module  # a dependency of tensorflow-datasets

    chunk = 65536  # records per read: bounded memory on 25m
    for path in paths:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            n = reader.num_records()
            for start in range(0, n, chunk):
                yield from reader.read(start, min(start + chunk, n))
        finally:
            reader.close()


def _tfrecord_records(paths: Sequence[str]) -> Iterator[bytes]:
    """Records of TFRecord files: [length u64][crc u32][data][crc u32], little-endian. The
    masked CRC32C checksums are not verified (the standard library has no CRC32C); framing is."""
    for path in paths:
        with open(path, "rb") as f:
            offset = 0
            while header := f.read(12):
                if len(header) < 12:
                    raise ValueError(f"{path}: truncated TFRecord header at byte {offset}")
                (length,) = struct.unpack("<Q", header[:8])
                data = f.read(length)
                if len(data) < length or len(f.read(4)) < 4:
                    raise ValueError(f"{path}: truncated TFRecord at byte {offset}")
                offset += 16 + length
                yield data


def _values(feature) -> Sequence:
    kind = feature.WhichOneof("kind")
    return getattr(feature, kind).value if kind else ()


def _add_example(feature, genre_names, movies: dict, users: dict, columns) -> None:
    """Append one decoded Example's rating to `columns`; note its movie and user once."""
    user_id = int(_values(feature["user_id"])[0])
    movie_id = int(_values(feature["movie_id"])[0])
    rating = _values(feature["user_rating"])[0]
    timestamp = int(_values(feature["timestamp"])[0])
    if movie_id not in movies:
        title = bytes(_values(feature["movie_title"])[0]).decode("utf-8")
        genres = tuple(genre_names[int(k)] for k in _values(feature["movie_genres"]))
        movies[movie_id] = (title, genres)
    if "user_gender" in feature and user_id not in users:
        age = feature["raw_user_age" if "raw_user_age" in feature else "bucketized_user_age"]
        users[user_id] = (
            "M" if _values(feature["user_gender"])[0] else "F",
            int(_values(age)[0]),
            bytes(_values(feature["user_occupation_text"])[0]).decode("utf-8"),
            bytes(_values(feature["user_zip_code"])[0]).decode("utf-8"),
        )
    for column, value in zip(columns, (user_id, movie_id, rating, timestamp), strict=True):
        column.append(value)


def ratings_from_examples(
    records: Iterable[bytes], genre_names: Sequence[str], source: str
) -> Ratings:
    """A Ratings table from serialized tf.train.Example records of a movielens `*-ratings`
    config (features as tensorflow-datasets 4.9.10 writes them; `genre_names` are the
    movie_genres ClassLabel names). User demographics are kept where present (100k, 1m):
    age is raw_user_age when there (100k), else bucketized_user_age."""
    from google.protobuf.message import DecodeError
    from tensorflow_datasets.proto import tf_example_pb2  # tensorflow-free Example protos

    parse = tf_example_pb2.Example.FromString
    columns = array("q"), array("q"), array("f"), array("q")  # user, movie, rating, timestamp
    movies: dict[int, tuple[str, tuple[str, ...]]] = {}
    users: dict[int, tuple[str, int, str, str]] = {}
    for n, record in enumerate(records):
        try:
            _add_example(parse(record).features.feature, genre_names, movies, users, columns)
        except (DecodeError, KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{source}: record {n} is not a movielens rating ({err!r})") from err
    user_ids, movie_ids, stars, times = columns
    return make_ratings(
        np.frombuffer(user_ids, np.int64),
        np.frombuffer(movie_ids, np.int64),
        np.frombuffer(stars, np.float32),
        np.frombuffer(times, np.int64),
        make_items(movies),
        make_users(users) if users else None,
        source=source,
    )
