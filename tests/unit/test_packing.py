"""Packing at the model level (stories260K, fp32, tuneforge's own loss and collators): a packed batch gives the same
loss as the padded one, and no example in a row sees another."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.data import DEFAULT_TEMPLATES, IGNORE, load_records, tokenize_records
from tuneforge.data.loader import Collator, PackedCollator, build_eval_batches, pack_rows
from tuneforge.models.attention import (PER_EXAMPLE, PackedCausalAttention, example_blocks,
                                        use_per_example_attention)
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
    """attn: a transformers backend, or per_example (sdpa switched to tuneforge's attention per example)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa" if attn == "per_example" else attn,
                                                 dtype=torch.float32).eval()
    if attn == "per_example":
        assert use_per_example_attention(model) and model.config._attn_implementation == PER_EXAMPLE
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager", "per_example"])
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


@pytest.mark.parametrize("attn", ["sdpa", "eager", "per_example"])
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


def test_example_blocks_open_at_every_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert example_blocks(pos, 2) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]
    assert example_blocks(pos[1:], 2) == [[(0, 9)], [(0, 9)]]  # (1, L) positions broadcast over the rows


def _grads(model, batch, checkpointing=False):
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    loss = causal_lm_loss(model, batch)
    loss.backward()
    model.eval()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_example_attention_gives_block_masks_loss_and_gradients(tok, examples, checkpointing):
    """The switch changes the kernel, not the values: fp32 loss and every gradient of a packed batch as sdpa's
    block mask gives them, with activation checkpointing recomputing through the same path."""
    batches = build_eval_batches(examples, 3, tok.pad_token_id, batching="packing", seq_length=512)
    batch = batches[0]
    assert int((batch["position_ids"] == 0).sum(1).min()) >= 3
    want_loss, want = _grads(_model("sdpa"), batch, checkpointing)
    got_loss, got = _grads(_model("per_example"), batch, checkpointing)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:  # summed (not averaged) losses: gradients up to ~100, fp32 rounding relative to that
        assert (got[name] - want[name]).abs().max() <= 3e-5 * want[name].abs().max(), name  # eager: 7e-6


def _blockwise_reference(q, k, v, blocks, scale):
    """Causal softmax attention in float64 on each block, written out plainly: the values both paths must give."""
    q, k, v = (t.double().repeat_interleave(q.size(1) // t.size(1), dim=1) if t is not q else t.double()
               for t in (q, k, v))
    out = torch.empty(q.size(0), q.size(2), q.size(1), q.size(3), dtype=torch.float64)
    for r, row in enumerate(blocks):
        for s, e in row:
            scores = q[r, :, s:e] @ k[r, :, s:e].transpose(1, 2) * scale
            scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            out[r, s:e] = (scores.softmax(-1) @ v[r, :, s:e]).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype, limit, tol", [
    (torch.float32, 0, 2e-6),        # every block through the flash kernel
    (torch.float32, 10**6, 2e-6),    # every block through the matmul path
    (torch.float32, 12, 2e-6),       # both paths in one batch
    (torch.bfloat16, 0, 0.08),
    (torch.bfloat16, 10**6, 0.08),
])
def test_packed_attention_gives_blockwise_causal_attention_and_its_gradients(dtype, limit, tol):
    """Both of PackedCausalAttention's paths (and a batch mixing them) against plain float64 attention per block,
    grouped key/value heads included: the outputs and the gradients of q, k and v."""
    g = torch.Generator().manual_seed(0)
    blocks = [[(0, 7), (7, 25), (25, 40)], [(0, 40)]]
    q, k, v = (torch.randn(2, heads, 40, 8, generator=g).to(dtype).requires_grad_() for heads in (6, 2, 2))
    weights = torch.randn(2, 40, 6, 8, generator=g).to(dtype)
    out = PackedCausalAttention.apply(q, k, v, blocks, 8 ** -0.5, limit)
    (out.float() * weights.float()).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _blockwise_reference(*leaves, blocks, 8 ** -0.5)
    (want * weights.double()).sum().backward()
    assert out.dtype == dtype and out.shape == want.shape
    assert (out.double() - want).abs().max() <= tol
    for got, ref in zip((q, k, v), leaves):
        assert (got.grad.double() - ref.grad).abs().max() <= tol * max(1.0, ref.grad.abs().max())


def test_per_example_attention_under_bf16_autocast_is_as_close_to_fp32_as_the_block_mask(tok, examples):
    """bf16 autocast, the path a bf16 CPU trains in (these blocks take the matmul path): against the fp32 loss and
    gradients of the packed batch, no further off than sdpa's block mask in bf16 (which errs by up to ~8% of a
    gradient's norm on this model: bf16 rounding, not a bug)."""
    batch = build_eval_batches(examples, 3, tok.pad_token_id, batching="packing", seq_length=512)[0]
    want_loss, want = _grads(_model("sdpa"), batch)
    bf16 = resolve_precision("bfloat16", "cpu")
    errors = {}
    for attn in ("sdpa", "per_example"):
        with bf16.context():
            loss, got = _grads(_model(attn), batch)
        assert got.keys() == want.keys()
        errors[attn] = (abs(loss - want_loss), max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want))
    assert errors["sdpa"][1] > 1e-3  # bf16 really ran
    assert errors["per_example"][0] <= 2 * errors["sdpa"][0] + 1e-3 * want_loss
    assert errors["per_example"][1] <= 1.5 * errors["sdpa"][1]


def test_per_example_attention_is_sdpa_for_padded_batches_and_generation(tok, examples):
    """Where there are no example blocks to read (padded batches, a cache), the switched model is sdpa exactly."""
    sdpa, ours = _model("sdpa"), _model("per_example")
    batch = Collator(tok.pad_token_id)(examples[:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(sdpa(**inputs).logits, ours(**inputs).logits)
    prompts = tok(["Once upon a time", "The little dog ran to the"], return_tensors="pt", padding=True,
                  padding_side="left")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(sdpa.generate(**prompts, **kw), ours.generate(**prompts, **kw))


def test_per_example_attention_is_not_saved_in_the_config(tmp_path):
    model = _model("per_example")
    model.save_pretrained(tmp_path)
    assert PER_EXAMPLE not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


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


def _live_tensors() -> list[torch.Tensor]:
    import gc

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def test_bf16_packed_attention_under_checkpointing_keeps_no_probabilities_and_gives_the_same_gradients(tok, examples):
    """PackedCausalAttention saves its per-block probabilities through save_for_backward: activation checkpointing
    then drops them after the forward and recomputes them in backward (kept on ctx, they would stay alive through
    the whole forward of every layer). Same loss and gradients with and without checkpointing, under bf16 autocast."""
    batch = build_eval_batches(examples, 3, tok.pad_token_id, batching="packing", seq_length=512)[0]
    bf16 = resolve_precision("bfloat16", "cpu")
    blocks = example_blocks(batch["position_ids"], batch["input_ids"].size(0))
    config = AutoModelForCausalLM.from_pretrained(STORIES).config
    kv, groups = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    prob_shapes = {(kv, groups * (e - s), e - s) for row in blocks for s, e in row}

    def run(checkpointing):
        model = _model("per_example")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with bf16.context():
            loss = causal_lm_loss(model, batch)
        live = _live_tensors()
        alive = sum(1 for t in live if tuple(t.shape) in prob_shapes and t.dtype == torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in live
                if t.untyped_storage().data_ptr() not in params}
        loss.backward()
        return (loss.item(), alive, sum(held.values()),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    plain_loss, plain_alive, plain_bytes, plain = run(False)
    ckpt_loss, ckpt_alive, ckpt_bytes, ckpt = run(True)
    assert plain_alive >= config.num_hidden_layers * len(prob_shapes)  # without checkpointing every layer keeps them
    assert ckpt_alive == 0
    assert ckpt_bytes < plain_bytes / 2  # what the forward leaves for backward: the peak, less than half
    assert ckpt_loss == plain_loss
    for name in plain:
        assert torch.equal(ckpt[name], plain[name]), name


def test_example_blocks_are_found_once_per_forward(tok, examples, monkeypatch):
    """Every layer reads the same position_ids: their blocks are found (a host copy on CUDA) once per forward."""
    from tuneforge.models import attention

    batch = build_eval_batches(examples, 3, tok.pad_token_id, batching="packing", seq_length=512)[0]
    calls = []
    find = attention._find_blocks
    monkeypatch.setattr(attention, "_find_blocks", lambda *a: calls.append(1) or find(*a))
    model = _model("per_example")
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert len(calls) == 1 and model.config.num_hidden_layers > 1
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].clone())  # another batch: again
    assert len(calls) == 2
