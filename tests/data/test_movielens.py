"""MovieLens raw files: the real ml-100k and ml-latest-small copies in ../shared (never copied
into the repository), the other layouts on tiny files written here, and malformed input."""

import csv
import re
import shutil

import numpy as np
import pytest

from jaxrec.data import (
    histories,
    leave_one_out,
    load_movielens,
    parse_title,
    preference_pairs,
    read_movielens_items,
)


@pytest.fixture(scope="module")
def root(shared_dir):
    return shared_dir / "data" / "movielens"


@pytest.fixture(scope="module")
def ml100k(root):
    return load_movielens("movielens-100k", root)


@pytest.fixture(scope="module")
def small(root):
    return load_movielens("movielens-latest-small", root)


def _item(table, movie_id):
    return int(table.items.index_of([movie_id])[0])


# ---------------------------------------------------------------------------------------------
# Real files


def test_ml100k_table(ml100k):
    assert (len(ml100k), ml100k.n_users, ml100k.n_items) == (100_000, 943, 1682)
    assert ml100k.source == "movielens-100k" and ml100k.skipped == 0
    assert ml100k.user_ids.tolist() == list(range(1, 944))
    assert ml100k.items.ids.tolist() == list(range(1, 1683))
    stars, counts = np.unique(ml100k.rating, return_counts=True)
    assert dict(zip(stars.tolist(), counts.tolist(), strict=True)) == {
        1.0: 6110,
        2.0: 11370,
        3.0: 27145,
        4.0: 34174,
        5.0: 21201,
    }
    assert (ml100k.timestamp.min(), ml100k.timestamp.max()) == (874724710, 893286638)


def test_ml100k_item_texts(ml100k):
    items = ml100k.items
    toy = _item(ml100k, 1)
    assert (items.title[toy], items.clean_title[toy], items.year[toy]) == (
        "Toy Story (1995)",
        "Toy Story",
        1995,
    )
    assert items.genres_of(toy) == ("Animation", "Children", "Comedy")
    star_wars = _item(ml100k, 50)
    assert items.genres_of(star_wars) == ("Action", "Adventure", "Romance", "Sci-Fi", "War")
    assert items.title[_item(ml100k, 543)] == "Misérables, Les (1995)"  # ISO-8859-1 0xE9
    unknown = _item(ml100k, 267)
    assert (items.title[unknown], items.year[unknown]) == ("unknown", -1)
    assert items.genres_of(unknown) == ("Unknown",)
    assert items.genres.any(axis=1).all()


def test_ml100k_users(ml100k):
    users = ml100k.users
    np.testing.assert_array_equal(users.ids, ml100k.user_ids)
    first = (users.gender[0], users.age[0], users.occupation[0], users.zip_code[0])
    assert first == ("M", 24, "technician", "85711")
    assert (np.sum(users.gender == "M"), np.sum(users.gender == "F")) == (670, 273)
    assert (users.age.min(), users.age.max()) == (7, 73)


def test_ml100k_split(ml100k):
    split = leave_one_out(ml100k)
    # every ml-100k user has at least 20 ratings: one test and one validation row each
    assert (len(split.test), len(split.val), len(split.train)) == (943, 943, 100_000 - 2 * 943)
    np.testing.assert_array_equal(ml100k.user[split.test], np.arange(943))
    np.testing.assert_array_equal(ml100k.user[split.val], np.arange(943))
    last_train = np.full(943, -1, np.int64)
    np.maximum.at(last_train, ml100k.user[split.train], ml100k.timestamp[split.train])
    assert np.all(ml100k.timestamp[split.val] >= last_train)
    assert np.all(ml100k.timestamp[split.test] >= ml100k.timestamp[split.val])
    # user 1's last two ratings tie at t=889751736 (items 74 and 102): the item index breaks it
    assert ml100k.items.ids[ml100k.item[split.val[0]]] == 74
    assert ml100k.items.ids[ml100k.item[split.test[0]]] == 102
    hist = histories(ml100k, split.train)
    assert sum(map(len, hist)) == len(split.train) and min(map(len, hist)) >= 18


def test_ml100k_preference_pairs(ml100k):
    split = leave_one_out(ml100k)
    pairs = preference_pairs(ml100k, split.train, pairs_per_user=8, seed=0)
    assert np.all(pairs.rating_hi > pairs.rating_lo)
    # both items are train ratings of that same user, with those ratings
    train = {
        (u, i): r
        for u, i, r in zip(
            ml100k.user[split.train].tolist(),
            ml100k.item[split.train].tolist(),
            ml100k.rating[split.train].tolist(),
            strict=True,
        )
    }
    for u, hi, lo, rhi, rlo in zip(
        pairs.user.tolist(),
        pairs.item_hi.tolist(),
        pairs.item_lo.tolist(),
        pairs.rating_hi.tolist(),
        pairs.rating_lo.tolist(),
        strict=True,
    ):
        assert train[(u, hi)] == rhi and train[(u, lo)] == rlo
    # users who gave one value only give no pairs; every other user gives 8
    values = [
        len(set(ml100k.rating[split.train][ml100k.user[split.train] == u])) for u in range(943)
    ]
    assert len(pairs) == 8 * sum(v > 1 for v in values)


def test_latest_small_table(small, root):
    assert (len(small), small.n_users, small.n_items) == (100_836, 610, 9724)
    assert small.users is None
    assert np.all(np.isin(small.rating, np.arange(1, 11) / 2))
    assert (small.timestamp.min(), small.timestamp.max()) == (828124615, 1537799250)
    catalogue = read_movielens_items("movielens-latest-small", root)
    assert len(catalogue) == 9742  # listed; 18 of them never rated
    assert np.all(np.isin(small.items.ids, catalogue.ids))
    toy = _item(small, 1)
    assert small.items.genres_of(toy) == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
    president = _item(small, 11)  # quoted in movies.csv: the title has a comma
    assert small.items.title[president] == "American President, The (1995)"
    assert small.items.clean_title[president] == "American President, The"
    death_note = int(catalogue.index_of([171749])[0])
    assert catalogue.title[death_note] == "Death Note: Desu nôto (2006–2007)"
    assert (catalogue.clean_title[death_note], catalogue.year[death_note]) == (
        "Death Note: Desu nôto",
        2006,
    )
    assert catalogue.genres_of(death_note) == ("(no genres listed)",)
    assert np.sum(catalogue.year == -1) == 12  # 13 titles lack "(YYYY)"; Death Note has a range


def test_latest_small_split(small):
    split = leave_one_out(small)
    assert (len(split.test), len(split.val)) == (610, 610)  # every user rated at least 20
    last_train = np.full(610, -1, np.int64)
    np.maximum.at(last_train, small.user[split.train], small.timestamp[split.train])
    assert np.all(small.timestamp[split.test] >= last_train)
    assert np.all(small.timestamp[split.test] >= small.timestamp[split.val])


def test_the_data_set_folder_itself_is_accepted(root, ml100k):
    direct = load_movielens("movielens-100k", root / "ml-100k")
    np.testing.assert_array_equal(direct.item, ml100k.item)


@pytest.mark.parametrize(
    "title, clean, year",
    [
        ("Toy Story (1995)", "Toy Story", 1995),
        (
            "From Dusk Till Dawn 2: Texas Blood Money (1999) ",
            "From Dusk Till Dawn 2: Texas Blood Money",
            1999,
        ),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "City of Lost Children, The (Cité des enfants perdus, La)",
            1995,
        ),
        (
            "Land Before Time III: The Time of the Great Giving (1995) (V)",
            "Land Before Time III: The Time of the Great Giving (V)",
            1995,
        ),
        ("Death Note: Desu nôto (2006–2007)", "Death Note: Desu nôto", 2006),
        ("Babylon 5", "Babylon 5", -1),
        ("(500) Days of Summer (2009)", "(500) Days of Summer", 2009),
        ("unknown", "unknown", -1),
    ],
)
def test_parse_title(title, clean, year):
    assert parse_title(title) == (clean, year)


# ---------------------------------------------------------------------------------------------
# The other layouts, on tiny files in the exact formats


def test_ml1m_format(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Misérables, Les (1995)::Drama|Musical\n"
        "3::Unrated (2000)::Drama\n".encode("iso-8859-1")
    )
    (folder / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "ratings.dat").write_bytes(
        b"1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n"
    )
    table = load_movielens("movielens-1m", tmp_path)
    assert (len(table), table.n_users, table.n_items) == (3, 2, 2)
    assert table.items.title.tolist() == ["Toy Story (1995)", "Misérables, Les (1995)"]
    assert table.items.genres_of(0) == ("Animation", "Children", "Comedy")
    assert table.user.tolist() == [0, 0, 1] and table.item.tolist() == [0, 1, 1]
    assert table.rating.tolist() == [5.0, 3.0, 4.0]
    users = table.users
    assert users.occupation.tolist() == ["K-12 student", "self-employed"]
    assert users.age.tolist() == [1, 56] and users.gender.tolist() == ["F", "M"]
    assert users.zip_code.tolist() == ["48067", "70072"]
    assert len(read_movielens_items("movielens-1m", tmp_path)) == 3


@pytest.mark.parametrize(
    "source, folder", [("movielens-20m", "ml-20m"), ("movielens-25m", "ml-25m")]
)
def test_current_csv_format(tmp_path, source, folder):
    data = tmp_path / folder
    data.mkdir()
    with open(data / "movies.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # CRLF line endings, quotes where needed, as GroupLens writes
        writer.writerow(["movieId", "title", "genres"])
        writer.writerow([1, "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"])
        writer.writerow([11, "American President, The (1995)", "Comedy|Drama|Romance"])
        writer.writerow([5, 'Say "Cheese" (2001)', "Documentary|IMAX"])
        writer.writerow([7, "Cosmos", "(no genres listed)"])
    with open(data / "ratings.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        writer.writerows([[3, 11, 3.5, 1100], [3, 1, 0.5, 1000], [1, 7, 5.0, 5], [1, 5, 4.0, 5]])
    table = load_movielens(source, tmp_path)
    assert (len(table), table.n_users, table.n_items) == (4, 2, 4)
    assert table.items.ids.tolist() == [1, 5, 7, 11]
    assert table.items.title.tolist() == [
        "Toy Story (1995)",
        'Say "Cheese" (2001)',
        "Cosmos",
        "American President, The (1995)",
    ]
    assert table.items.year.tolist() == [1995, 2001, -1, 1995]
    assert table.items.genres_of(1) == ("Documentary", "IMAX")
    assert table.items.genres_of(2) == ("(no genres listed)",)
    # user 1's two ratings tie at t=5: item 5 (dense 1) before item 7 (dense 2)
    assert table.item.tolist() == [1, 2, 0, 3]
    assert table.rating.tolist() == [4.0, 5.0, 0.5, 3.5]
    assert table.users is None


# ---------------------------------------------------------------------------------------------
# Bad input

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join("0001110000000000000") + "\n"
    "2|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join("0110000000000000100") + "\n"
)
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n"
U_DATA = ["1\t1\t5\t874965758", "1\t2\t3\t876893171", "2\t1\t4\t878542960", "2\t2\t1\t876893119"]


def _ml100k(tmp_path, data=U_DATA, item=U_ITEM, user=U_USER):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("\n".join(data) + "\n", encoding="iso-8859-1")
    (folder / "u.item").write_text(item, encoding="iso-8859-1")
    (folder / "u.user").write_text(user, encoding="iso-8859-1")
    return folder


def test_tiny_ml100k_without_u_genre(tmp_path):
    _ml100k(tmp_path)  # no u.genre: the documented 19 genre columns are used
    table = load_movielens("movielens-100k", tmp_path)
    assert (len(table), table.n_users, table.n_items) == (4, 2, 2)
    assert table.items.genres_of(0) == ("Animation", "Children", "Comedy")
    assert table.items.genres_of(1) == ("Action", "Adventure", "Thriller")


@pytest.mark.parametrize(
    "line, why",
    [
        ("1\t2\t3", r"expected 4 fields separated by '\\t', got 3: '1\\t2\\t3'"),
        ("x\t2\t3\t876893171", r"user id 'x' is not an integer"),
        ("1\t2\tfour\t876893171", r"rating 'four' is not a number"),
        ("1\t2\t7\t876893171", r"rating 7 is outside \[0.5, 5\]"),
        ("1\t2\t3\t8768.5", r"timestamp '8768.5' is not an integer"),
        ("1\t9\t3\t876893171", r"movie id 9 is not in u.item"),
        ("5\t2\t3\t876893171", r"user id 5 is not in u.user"),
    ],
)
def test_malformed_rating_row_names_file_and_line(tmp_path, line, why):
    folder = _ml100k(tmp_path, data=[*U_DATA[:2], line, *U_DATA[2:]])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'u.data'))}, line 3: {why}$"):
        load_movielens("movielens-100k", tmp_path)


def test_malformed_item_row(tmp_path):
    bad = U_ITEM + "3|Four Rooms (1995)|01-Jan-1995||http://x|" + "|".join("0000000000000000120")
    folder = _ml100k(tmp_path, item=bad)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(folder / 'u.item'))}, line 3: genre flags must be"
    ):
        load_movielens("movielens-100k", tmp_path)


def test_lenient_skips_and_counts(tmp_path):
    data = [*U_DATA[:1], "1\t2\t3", "junk", *U_DATA[1:], "1\t9\t3\t876893171"]
    user = U_USER + "3|x|M|writer|0\n"  # a bad age: the user row is skipped
    _ml100k(tmp_path, data=data, user=user)
    table = load_movielens("movielens-100k", tmp_path, lenient=True)
    assert len(table) == 4 and table.skipped == 4
    assert table.skipped_notes[0].endswith("u.user, line 3: age 'x' is not an integer")
    assert "u.data, line 2: expected 4 fields" in table.skipped_notes[1]
    assert "u.data, line 7: movie id 9 is not in u.item" in table.skipped_notes[3]
    assert "skipped=4" in repr(table)


def test_everything_skipped_gives_an_empty_table(tmp_path):
    _ml100k(tmp_path, data=["1\t2\t3", "junk"])
    table = load_movielens("movielens-100k", tmp_path, lenient=True)
    assert (len(table), table.n_users, table.n_items, table.skipped) == (0, 0, 0, 2)
    split = leave_one_out(table)
    assert len(split.train) == len(split.val) == len(split.test) == 0
    assert histories(table) == [] and len(preference_pairs(table)) == 0


def test_csv_errors(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "movies.csv").write_text("movieId,title,genres\r\n1,Toy Story (1995),Comedy\r\n")
    ratings = folder / "ratings.csv"
    ratings.write_text("userId,movieId,rating\r\n1,1,4.0\r\n")
    with pytest.raises(
        ValueError,
        match=r"line 1: expected the header "
        r"'userId,movieId,rating,timestamp'",
    ):
        load_movielens("movielens-latest-small", tmp_path)
    ratings.write_bytes(b"userId,movieId,rating,timestamp\r\n1,1,4.0,5\r\n1,1,\xff,6\r\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(ratings))}, line 3: not utf-8 text"):
        load_movielens("movielens-latest-small", tmp_path)
    ratings.write_text("userId,movieId,rating,timestamp\r\n1,1,4.0,5\r\n1,1,4.0\r\n")
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(ratings))}, line 3: expected 4 fields, got 3$"
    ):
        load_movielens("movielens-latest-small", tmp_path)
    table = load_movielens("movielens-latest-small", tmp_path, lenient=True)
    assert (len(table), table.skipped) == (1, 1)


@pytest.fixture()
def real_copy(tmp_path, root):
    """A writable copy of the real ml-100k, to corrupt."""
    folder = tmp_path / "ml-100k"
    shutil.copytree(root / "ml-100k", folder)
    return folder


def _prepend(path, line):
    path.write_bytes(line.encode("iso-8859-1") + b"\n" + path.read_bytes())


HUGE = "99999999999999999999"  # 20 digits: more than int64 holds


@pytest.mark.parametrize(
    "file, line, why",
    [
        ("u.data", f"196\t242\t3\t{HUGE}", f"timestamp '{HUGE}' is outside the int64 range"),
        ("u.data", f"196\t{HUGE}\t3\t881250949", f"movie id '{HUGE}' is outside the int64 range"),
        ("u.data", f"-{HUGE}\t242\t3\t881250949",
         f"user id '-{HUGE}' is outside the int64 range"),
        ("u.item", f"{HUGE}|X (1990)|01-Jan-1990||http://x|" + "|".join("0" * 18 + "1"),
         f"movie id '{HUGE}' is outside the int64 range"),
        ("u.user", f"{HUGE}|24|M|technician|85711", f"user id '{HUGE}' is outside the int64 range"),
        ("u.user", "1000|99999999999|M|technician|85711",
         "age '99999999999' is outside the int32 range"),
    ],
    ids=["timestamp", "movie-id", "user-id", "item-id", "user-row-id", "age"],
)
def test_numbers_too_big_are_bad_rows(real_copy, file, line, why):
    _prepend(real_copy / file, line)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(real_copy / file))}, line 1: "
                                         rf"{re.escape(why)}$"):
        load_movielens("movielens-100k", real_copy.parent)
    table = load_movielens("movielens-100k", real_copy.parent, lenient=True)
    assert (len(table), table.skipped) == (100_000, 1)  # the real rows all stay
    assert table.skipped_notes[0].endswith(f"{file}, line 1: {why}")


def test_empty_or_duplicated_u_genre_names_u_genre(real_copy):
    genre = real_copy / "u.genre"
    text = genre.read_text(encoding="iso-8859-1")
    genre.write_text(text + "Extra|5\n", encoding="iso-8859-1")
    line = text.count("\n") + 1  # the real file ends with a blank line
    with pytest.raises(ValueError, match=rf"^{re.escape(str(genre))}, line {line}: genre index 5 "
                                         "is listed twice$"):
        load_movielens("movielens-100k", real_copy.parent)
    table = load_movielens("movielens-100k", real_copy.parent, lenient=True)
    assert table.skipped == 1 and "Comedy" in table.items.genre_names  # not renamed 'Extra'
    genre.write_text("")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(genre))}: lists no genres"):
        load_movielens("movielens-100k", real_copy.parent)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"no folder .*ml-100k \(expected ml-100k/ "
        r"holding u.data, u.item\)",
    ):
        load_movielens("movielens-100k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        load_movielens("movielens-1m", tmp_path / "nowhere")
    folder = _ml100k(tmp_path)
    (folder / "u.item").unlink()
    with pytest.raises(FileNotFoundError, match=r"ml-100k has no u.item \(expected u.data, "):
        load_movielens("movielens-100k", tmp_path)


def test_unknown_source_and_ambiguous_dirs(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown MovieLens source 'ml-100k'; expected one of "
        r"\['movielens-100k', 'movielens-1m', ",
    ):
        load_movielens("ml-100k", tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_movielens("movielens-100k", tmp_path, tfds_dir=tmp_path)


@pytest.mark.parametrize("source", ["movielens-100k", "movielens-latest-small"])
def test_bulk_and_row_by_row_readers_agree(root, source):
    from jaxrec.data import movielens as ml

    folder, layout = ml._folder(source, root)
    movies = ml._read_movies(folder, layout, ml._Issues(False))
    users = ml._users_100k(folder / "u.user", ml._Issues(False)) if layout == "100k" else None
    path = folder / ml._FILES[layout][0][0]
    bulk = ml._ratings_fast(path, layout, movies, users)
    assert bulk is not None  # the real files are clean: the bulk reader takes them
    by_row = ml._ratings_by_row(path, layout, movies, users, ml._Issues(False))
    for a, b in zip(bulk, by_row, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "chunk, sep, rows",
    [
        (b"1,2,3.5,4\n", b",", [[1, 2, 3.5, 4]]),
        (b"1,2,3,4\r\n5,6,.5,7\n", b",", [[1, 2, 3, 4], [5, 6, 0.5, 7]]),  # float(".5") too
        (b"0001\t2\t4.\t3\n", b"\t", [[1, 2, 4, 3]]),
        (b"1::2::3::4\n", b"::", [[1, 2, 3, 4]]),
        (b"", b",", np.zeros((0, 4))),
    ],
)
def test_bulk_parse_takes_clean_lines(chunk, sep, rows):
    from jaxrec.data.movielens import _bulk_parse

    np.testing.assert_array_equal(_bulk_parse(chunk, sep), rows)


@pytest.mark.parametrize(
    "chunk, sep",
    [
        (b"1,2,3\n4,5,6,7,8\n", b","),  # 3 then 5 fields: 8 in all, but not 4 per line
        (b"1.0,2,3,4\n", b","),  # the row reader rejects a non-integer id
        (b"1,2,3,,4\n", b","),
        (b"1,2,.,4\n", b","),
        (b"1,2,3.5.5,4\n", b","),
        (b"1,2,3.5,4.5\n", b","),
        (b"1,2,3,4\r5,6,7,8\n", b","),
        (b"1,2,3,1234567890123456\n", b","),  # 16 digits: not exact in float64
        (b"1,2,3, 4\n", b","),
        (b"1,2,3,-4\n", b","),
        (b'"1",2,3,4\n', b","),
        (b"\n", b","),  # a blank line: the row reader skips it
        (b"1,2\t3\t4\n", b"\t"),  # 3 tab-separated fields
        (b"1::2:3::4::5\n", b"::"),
    ],
)
def test_bulk_parse_leaves_other_lines_to_the_row_reader(chunk, sep):
    from jaxrec.data.movielens import _bulk_parse

    assert _bulk_parse(chunk, sep) is None
