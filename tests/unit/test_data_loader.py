"""Batching modes, weighted mixing, exact mid-epoch resume, rank sharding, validation hold-out and the cache."""
import json
import shutil

import numpy as np
import pytest
import torch

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.data import IGNORE, TokenTable, build_train_loader, prepare_data, prepare_set
from tuneforge.data.loader import MicroBatchSampler, epoch_order
from tuneforge.config.sources import validation_sets
from tests.conftest import SQUAD_DEV, SQUAD_TRAIN

MODES = ["pad_longest", "pad_to_max_length", "group_by_length", "packing"]


@pytest.fixture(scope="module")
def table(tok, tmp_path_factory):
    data = DataConfig(train=DataSource(path=str(SQUAD_TRAIN), limit=60), seq_length=256,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))
    return prepare_set(data, [data.train], tok, progress=False).examples


def test_weighted_sources_are_drawn_in_proportion():
    sizes, weights = [50, 400, 150], [2.0, 1.0, 1.0]
    picks = torch.cat([epoch_order(sizes, weights, seed=5, epoch=e) for e in range(20)])
    source = torch.bucketize(picks, torch.tensor([50, 450]), right=True)
    share = torch.bincount(source, minlength=3).double() / len(picks)
    n = len(picks)
    for got, want in zip(share.tolist(), [0.5, 0.25, 0.25]):
        assert abs(got - want) < 4 * (want * (1 - want) / n) ** 0.5  # within 4 standard errors
    # Seeded: the same seed draws the same order, another seed another one; the small source is reshuffled, not
    # repeated in the same order, when it is drawn more often than it has examples.
    assert torch.equal(epoch_order(sizes, weights, 5, 0), epoch_order(sizes, weights, 5, 0))
    assert not torch.equal(epoch_order(sizes, weights, 5, 0), epoch_order(sizes, weights, 6, 0))
    first = epoch_order(sizes, weights, 5, 0)
    small = first[first < 50].tolist()
    assert len(small) > 50 and sorted(small[:50]) == list(range(50))


def test_single_source_order_is_the_plain_seeded_permutation():
    g = torch.Generator().manual_seed(3 * 100_003 + 2)
    assert torch.equal(epoch_order([40], None, 3, 2), torch.randperm(40, generator=g))


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("mode", MODES)
def test_loader_resumes_mid_epoch_exactly(table, tok, mode):
    def build():
        return build_train_loader(table, 4, tok.pad_token_id, seed=0, batching=mode, seq_length=256)
    full = build()
    per_epoch = full.batch_sampler.per_rank
    expected = _take(iter(full), per_epoch + 5)  # crosses into the second epoch
    first = build()
    it = iter(first)
    head = _take(it, per_epoch - 3)
    state = first.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    got = head + _take(iter(resumed), 8)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_keeps_the_labelled_tokens_and_shards_by_rank(table, tok, mode):
    one = MicroBatchSampler(len(table), 2, seed=1, batching=mode, lengths=table.lengths, seq_length=256)
    ranks = [MicroBatchSampler(len(table), 2, seed=1, rank=r, world_size=2, batching=mode, lengths=table.lengths,
                               seq_length=256) for r in range(2)]
    a, r0, r1 = iter(one), iter(ranks[0]), iter(ranks[1])
    for _ in range(ranks[0].per_rank):
        assert next(a) + next(a) == next(r0) + next(r1)
    loader = build_train_loader(table, 2, tok.pad_token_id, seed=1, batching=mode, seq_length=256)
    flat = lambda mb: [i for x in mb for i in (x if isinstance(x, tuple) else (x,))]  # noqa: E731
    plan = loader.batch_sampler._plan(0)
    it = iter(loader)
    for mb in plan[:6]:
        batch = next(it)
        want = sum(sum(1 for t in table[i].labels[1:] if t != IGNORE) for i in flat(mb))
        assert int((batch["labels"][:, 1:] != IGNORE).sum()) == want  # loss normalisation sees the same tokens
        if mode == "pad_to_max_length":
            assert batch["input_ids"].shape[1] == 256
        if mode == "packing":
            assert batch["input_ids"].shape[1] <= 256 and "attention_mask" not in batch
    if mode in ("pad_longest", "pad_to_max_length"):
        g = torch.Generator().manual_seed(1 * 100_003)
        assert [i for mb in plan for i in mb] == torch.randperm(len(table), generator=g).tolist()[: len(plan) * 2]


def test_group_by_length_reduces_padding(table):
    from tuneforge.data.loader import batching_report
    plain = MicroBatchSampler(len(table), 4, seed=0, lengths=table.lengths, seq_length=256)
    grouped = MicroBatchSampler(len(table), 4, seed=0, batching="group_by_length", lengths=table.lengths,
                                seq_length=256)
    waste = lambda s, m: batching_report(table.lengths, s._plan(0), m, 256)["padding_waste"]  # noqa: E731
    assert waste(grouped, "group_by_length") < waste(plain, "pad_longest")
    assert sorted(i for mb in grouped._plan(0) for i in mb) == sorted(i for mb in plain._plan(0) for i in mb)


def test_val_split_holds_out_a_seeded_fraction(tok, tmp_path):
    data = DataConfig(train=DataSource(path=str(SQUAD_TRAIN), limit=40), seq_length=256, val_split=0.25,
                      cache_dir=str(tmp_path))
    train, vals = prepare_data(data, tok, seed=0, progress=False)
    assert list(vals) == ["val_split"] and len(vals["val_split"].examples) == 10 and len(train.examples) == 30
    whole = prepare_set(data, [data.train], tok, progress=False).examples
    seqs = lambda t: {tuple(t[i].input_ids) for i in range(len(t))}  # noqa: E731
    assert seqs(train.examples) | seqs(vals["val_split"].examples) == seqs(whole)
    assert not seqs(train.examples) & seqs(vals["val_split"].examples)
    again = prepare_data(data, tok, seed=0, progress=False)[1]["val_split"].examples
    assert np.array_equal(again.ids, vals["val_split"].examples.ids)


def test_several_validation_sets_are_named(tok, tmp_path):
    data = DataConfig(train=DataSource(path=str(SQUAD_TRAIN), limit=8),
                      validation=[DataSource(path=str(SQUAD_DEV), limit=4, name="squad"),
                                  DataSource(path=str(SQUAD_TRAIN), limit=3)],
                      seq_length=256, cache_dir=str(tmp_path))
    _, vals = prepare_data(data, tok, seed=0, progress=False)
    assert {k: len(v.examples) for k, v in vals.items()} == {"squad": 4, "train": 3}
    assert list(vals) == [name for name, _ in validation_sets(data)]  # `tuneforge eval` names them the same


def test_cache_hits_when_unchanged_and_misses_on_template_data_or_length(tok, tmp_path):
    src = tmp_path / "train.json"
    shutil.copy(SQUAD_TRAIN, src)
    data = DataConfig(train=DataSource(path=str(src), limit=20), seq_length=256, cache_dir=str(tmp_path / "c"))

    def run(d):
        return prepare_set(d, [d.train], tok, progress=False)
    first = run(data)
    assert not first.sources[0].cached
    hit = run(data)
    assert hit.sources[0].cached and np.array_equal(hit.examples.ids, first.examples.ids)
    assert np.array_equal(hit.examples.mask, first.examples.mask)
    assert hit.sources[0].stats.summary() == first.sources[0].stats.summary()
    templated = DataConfig(train=data.train, seq_length=256, cache_dir=data.cache_dir,
                           prompt_template="Q: {question} C: {context} A:")
    assert not run(templated).sources[0].cached
    assert not run(DataConfig(train=data.train, seq_length=200, cache_dir=data.cache_dir)).sources[0].cached
    doc = json.loads(src.read_text())
    doc["data"][0]["paragraphs"][0]["qas"][0]["question"] += " (edited)"
    src.write_text(json.dumps(doc))
    changed = run(data)
    assert not changed.sources[0].cached and not np.array_equal(changed.examples.ids, first.examples.ids)
    assert run(data).sources[0].cached
    off = DataConfig(train=data.train, seq_length=256, cache_dir=data.cache_dir, cache=False)
    assert not run(off).sources[0].cached


def test_token_table_round_trips_examples(tok, table):
    again = TokenTable.from_examples([table[i] for i in range(len(table))])
    assert np.array_equal(again.ids, table.ids) and np.array_equal(again.offsets, table.offsets)


def test_val_split_of_one_or_more_holds_out_that_many_examples(tok, tmp_path):
    data = DataConfig(train=DataSource(path=str(SQUAD_TRAIN), limit=40), seq_length=256, val_split=7,
                      cache_dir=str(tmp_path))
    train, vals = prepare_data(data, tok, seed=0, progress=False)
    assert len(vals["val_split"].examples) == 7 and len(train.examples) == 33


@pytest.mark.parametrize("value", [0, 1.5, -3])
def test_val_split_is_a_fraction_or_a_whole_count(value):
    from tuneforge.config import load_config
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match="data.val_split: expected a fraction"):
        load_config({"model": {"name_or_path": "org/model"}, "data": {"train": {"path": "org/data"},
                                                                       "val_split": value}})
