"""Packing at the model level (stories260K, fp32, tuneforge's own loss and collators): a packed batch gives the same
loss as the padded one, and no example in a row sees another."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.data import DEFAULT_TEMPLATES, IGNORE, load_records, tokenize_records
from tuneforge.data.loader import Collator, PackedCollator, build_eval_batches, pack_rows
from tuneforge.models.load import resolve_precision
from tuneforge.models.loss import causal_lm_loss, count_label_tokens
from tuneforge.distributed import DistEnv, TrainModule
from tuneforge.eval.validate import validate
from tests.conftest import SQUAD_DEV, STORIES

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)


@pytest.fixture(scope="module")
def examples(tok):
    records = load_records(str(SQUAD_DEV), "squad", limit=24)
    return tokenize_records(records, tok, DEFAULT_TEMPLATES["squad"], 160)[0]


def _model(attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_validation_loss_equals_padded(tok, examples, attn):
    model = _model(attn)
    fp32 = resolve_precision("float32", "cpu")
    padded = build_eval_batches(examples, 4, tok.pad_token_id)
    packed = build_eval_batches(examples, 2, tok.pad_token_id, batching="packing", seq_length=512)
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in padded)
    assert max(int((b["position_ids"] == 0).sum(1).max()) for b in packed) >= 3  # rows really hold several examples
    assert sum(count_label_tokens(b) for b in packed) == sum(count_label_tokens(b) for b in padded)
    module, env = TrainModule(model), DistEnv()  # what the training loop validates through
    want, got = validate(module, padded, fp32, env)["val_loss"], validate(module, packed, fp32, env)["val_loss"]
    assert got == pytest.approx(want, abs=1e-5)


def _row_losses(model, row, collate):
    """Summed loss of each example of one packed row, computed from the packed batch."""
    batch = collate([row])
    out, at = [], 0
    for ex in row:
        n = len(ex.input_ids)
        only = torch.full_like(batch["labels"], IGNORE)
        only[0, at + 1:at + n] = batch["labels"][0, at + 1:at + n]
        with torch.no_grad():
            out.append(float(causal_lm_loss(model, dict(batch, labels=only))))
        at += n
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_example_sees_another_in_its_row(tok, examples, attn):
    model = _model(attn)
    collate, row = PackedCollator(tok.pad_token_id), examples[:3]
    assert sum(len(ex.input_ids) for ex in row) <= 512
    alone = []
    for ex in row:  # each example unpacked, on its own
        with torch.no_grad():
            alone.append(float(causal_lm_loss(model, Collator(tok.pad_token_id)([ex]))))
    packed = _row_losses(model, row, collate)
    assert packed == pytest.approx(alone, abs=1e-4)
    # Change every token of the first example: the other two examples' losses do not move.
    g = torch.Generator().manual_seed(0)
    first = type(row[0])(torch.randint(3, 500, (len(row[0].input_ids),), generator=g).tolist(), list(row[0].labels))
    changed = _row_losses(model, [first] + row[1:], collate)
    assert changed[0] != pytest.approx(packed[0], abs=1e-3)
    assert changed[1:] == pytest.approx(packed[1:], abs=1e-5)


def test_positions_that_do_not_restart_would_leak(tok, examples):
    """The check above can fail: with one position run per row, example 2 sees example 1 and its loss moves."""
    model = _model("sdpa")
    row = examples[:2]
    batch = PackedCollator(tok.pad_token_id)([row])
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    n0 = len(row[0].input_ids)
    only = torch.full_like(batch["labels"], IGNORE)
    only[0, n0 + 1:] = batch["labels"][0, n0 + 1:]
    with torch.no_grad():
        good = float(causal_lm_loss(model, dict(batch, labels=only)))
        bad = float(causal_lm_loss(model, dict(leaky, labels=only)))
    assert abs(good - bad) > 1e-3


def test_pack_rows_never_overflows_and_keeps_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 200, size=500)
    rows = pack_rows(range(500), lengths, 256, window=128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert sum(lengths) / (256 * len(rows)) > 0.9


def test_flash_attention_packing_needs_flash_attn_and_cuda():
    from tuneforge.data.loader import check_packing_backend
    from tuneforge.errors import UserError

    check_packing_backend("sdpa", "cpu")
    check_packing_backend("eager", "cpu")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"pip install 'tuneforge\[flash\]'"):
            check_packing_backend("flash_attention_2", "cuda")
    else:
        with pytest.raises(UserError, match="CUDA only"):
            check_packing_backend("flash_attention_2", "cpu")
