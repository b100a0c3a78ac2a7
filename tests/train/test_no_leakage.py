"""No leakage: each user's validation and test items never reach SFT examples, reward-model
pairs, the simulator's fit or its sessions, PPO's ptx rows; the validation item reaches only
the SFT stage's held-out (model selection) examples.

Every user's validation and test ratings are moved to canary items that nobody else rated, so
any path that lets a held-out rating through shows a canary id.
"""

import dataclasses

import numpy as np
import pytest

import jaxrec.train.setup as world
from jaxrec.config import config_from_dict
from jaxrec.data import Items, leave_one_out, load_movielens, make_ratings
from jaxrec.train import reward_model, sft
from jaxrec.train.setup import build_setup

CANARY = 10_000_000  # original ids of the canary items: CANARY + 2 u (validation), + 1 (test)


def _canary_table(ratings):
    split = leave_one_out(ratings)
    item_ids = ratings.items.ids[ratings.item].copy()
    users = ratings.user
    item_ids[split.val] = CANARY + 2 * users[split.val]
    item_ids[split.test] = CANARY + 2 * users[split.test] + 1
    new = np.unique(item_ids[item_ids >= CANARY])
    items = ratings.items
    canaries = Items(ids=new, title=np.array([f"Canary {i} (2000)" for i in new]),
                     clean_title=np.array([f"Canary {i}" for i in new]),
                     year=np.full(len(new), 2000, np.int32),
                     genres=np.zeros((len(new), items.genres.shape[1]), bool),
                     genre_names=items.genre_names)
    both = Items(**{f.name: (np.concatenate([getattr(items, f.name), getattr(canaries, f.name)])
                             if f.name != "genre_names" else items.genre_names)
                    for f in dataclasses.fields(Items)})
    table = make_ratings(ratings.user_ids[users], item_ids, ratings.rating, ratings.timestamp,
                         both, ratings.users, source=ratings.source)
    moved = leave_one_out(table)
    canary = table.items.ids >= CANARY
    # the canaries are exactly the held-out ratings of the new table
    assert canary[table.item[moved.val]].all() and canary[table.item[moved.test]].all()
    assert not canary[table.item[moved.train]].any()
    val_items = np.flatnonzero(canary & (table.items.ids % 2 == 0))
    test_items = np.flatnonzero(canary & (table.items.ids % 2 == 1))
    return table, val_items, test_items


@pytest.fixture(scope="module")
def canaries(shared_dir):
    ratings = load_movielens("movielens-100k", data_dir=shared_dir / "data/movielens")
    return _canary_table(ratings)


def _none_of(items, array, what):
    found = np.intersect1d(np.asarray(array).ravel(), items)
    assert len(found) == 0, f"{what} holds held-out items {found[:5]}"


@pytest.mark.parametrize("items", ["text", "tokens"])
def test_held_out_ratings_reach_only_the_validation_examples(canaries, monkeypatch, items):
    table, val_items, test_items = canaries
    held = np.concatenate([val_items, test_items])
    for module in (world, sft, reward_model):
        monkeypatch.setattr(module, "load_ratings", lambda config: table)
    config = config_from_dict({}, [
        "data.source=movielens-100k", "data.dir=unused", "sim.preset=movielens",
        "sim.history_len=30", "rollout.history_items=30", "sim.future_items=3",
        f"model.items={items}", "model.d_model=32", "model.n_layers=1", "sft.eval_users=64"])
    setup = build_setup(config)
    params = setup.env_params
    # the simulator: fit rows, start histories and the logged sequences of its sessions
    pop = np.asarray(params.popularity)
    assert (pop[held] == 0).all() and pop.sum() > 0
    _none_of(held, params.histories, "the simulator's start histories")
    _none_of(held, params.sequences, "the simulator's logged sequences")
    # SFT: training examples and PPO-ptx rows never see a held-out item
    data = sft.build_sft_data(config, setup)
    rows = sft.ptx_rows(data.train, setup.codec)
    offset = setup.codec.item_token_offset
    if items == "tokens":
        _none_of(held + offset, data.train.tokens, "SFT training sequences")
        _none_of(test_items, data.eval.history, "SFT held-out histories")
        # model selection reads the validation item, and only it
        assert np.isin(np.asarray(data.eval.next_item), val_items).all()
        _none_of(held + offset, rows.tokens, "PPO-ptx rows")
    else:
        for name in ("history", "next_item"):
            _none_of(held, getattr(data.train, name), f"SFT training {name}")
            _none_of(held, getattr(data.eval, name), f"SFT held-out {name}")
        blocks = np.asarray(setup.codec.item_tokens)
        canary_tokens = np.setdiff1d(blocks[held].ravel(), blocks[np.setdiff1d(
            np.arange(len(blocks)), held)].ravel())  # tokens only canary titles use
        _none_of(canary_tokens, rows.tokens, "PPO-ptx rows")
    # reward-model pairs come from training ratings only
    train, held_out, _ = reward_model._ratings_tables(config, params, ban=False)
    for part in (train, held_out):
        _none_of(held, part["hi"], "reward pairs")
        _none_of(held, part["lo"], "reward pairs")
