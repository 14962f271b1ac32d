"""Preference losses by hand, and the invariances of a preference step: the first sigmoid loss is ln 2, accumulation
is the bigger batch, packed is unpacked, the reference is the adapter switched off."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config.preference_losses import LOSS_NAMES
from tuneforge.config.schema import PeftConfig, PreferenceConfig
from tuneforge.data.pairs import PackedPairCollator, Pair, PairCollator, PairSet
from tuneforge.distributed import DistEnv, TrainModule
from tuneforge.models.load import resolve_precision
from tuneforge.models.preference import pair_losses
from tuneforge.peft import apply_peft
from tuneforge.eval.preference import PreferenceStep
from tuneforge.train.preference import accumulate_preference

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)

# two pairs: summed log-probs (chosen, rejected) of the policy and the reference, and completion lengths
POLICY = [[-4.0, -7.5], [-10.0, -9.0]]
REFERENCE = [[-5.0, -6.0], [-9.5, -9.75]]
TOKENS = [[4, 5], [8, 6]]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(loss_type: str, beta: float, e: float = 0.0, gamma: float = 0.5) -> list[tuple[float, float, float]]:
    """(loss, chosen reward, rejected reward) per pair, from the published formulas, in plain floats."""
    out = []
    for (pc, pr), (rc, rr), (nc, nr) in zip(POLICY, REFERENCE, TOKENS):
        h = (pc - rc) - (pr - rr)
        if loss_type == "ipo":  # per-token log-ratios in the loss (the rewards stay on the sums)
            h = (pc - rc) / nc - (pr - rr) / nr
        if loss_type in ("simpo", "orpo"):
            pc, pr = pc / nc, pr / nr
        if loss_type == "sigmoid":
            loss = -(1 - e) * logsig(beta * h) - e * logsig(-beta * h)
        elif loss_type == "robust":
            loss = (-(1 - e) * logsig(beta * h) + e * logsig(-beta * h)) / (1 - 2 * e)
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        elif loss_type == "bco_pair":  # each side's reward against 0
            loss = -logsig(beta * (pc - rc)) - logsig(-beta * (pr - rr))
        elif loss_type == "simpo":
            loss = -logsig(beta * (pc - pr) - gamma)
        else:  # orpo: log odds = log p - log(1 - p)
            odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
            loss = -beta * logsig(odds)
        if loss_type in ("simpo", "orpo"):
            out.append((loss, beta * pc, beta * pr))
        else:
            out.append((loss, beta * (pc - rc), beta * (pr - rr)))
    return out


@pytest.mark.parametrize("loss_type,beta,e", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.3, 0.1),
                                              ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0), ("ipo", 0.1, 0.0),
                                              ("simpo", 2.0, 0.0), ("orpo", 0.1, 0.0)])
def test_losses_equal_the_hand_computed_values(loss_type, beta, e):
    policy, tokens = torch.tensor(POLICY, dtype=torch.float64), torch.tensor(TOKENS)
    reference = torch.tensor(REFERENCE, dtype=torch.float64)
    loss, chosen, rejected, _ = pair_losses(loss_type, beta, policy, tokens, reference, e, simpo_gamma=0.5)
    for k, (want_loss, want_chosen, want_rejected) in enumerate(by_hand(loss_type, beta, e)):
        assert loss[k].item() == pytest.approx(want_loss, abs=1e-12)
        assert chosen[k].item() == pytest.approx(want_chosen, abs=1e-12)
        assert rejected[k].item() == pytest.approx(want_rejected, abs=1e-12)
    if loss_type == "hinge" and beta == 2.0:
        assert loss[0].item() == 0.0  # a margin past 1 / beta: no loss, no gradient


# the losses by_hand computes; every registry entry must be one (config/preference_losses.py)
HAND_COMPUTED = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "simpo", "orpo")


def test_every_registry_loss_has_a_hand_computed_formula():
    assert sorted(HAND_COMPUTED) == sorted(LOSS_NAMES)


@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("loss_type", LOSS_NAMES)
def test_every_registry_loss_equals_its_hand_computed_values(loss_type, beta):
    policy, tokens = torch.tensor(POLICY, dtype=torch.float64), torch.tensor(TOKENS)
    reference = torch.tensor(REFERENCE, dtype=torch.float64)
    loss, chosen, rejected, _ = pair_losses(loss_type, beta, policy, tokens, reference)
    for k, (want_loss, want_chosen, want_rejected) in enumerate(by_hand(loss_type, beta)):
        assert loss[k].item() == pytest.approx(want_loss, abs=1e-12)
        assert chosen[k].item() == pytest.approx(want_chosen, abs=1e-12)
        assert rejected[k].item() == pytest.approx(want_rejected, abs=1e-12)


def test_bco_pair_is_2_ln2_at_the_reference_and_pulls_each_side_on_its_own():
    """bco_pair (TRL 1.16's): -log s(beta r_chosen) - log s(-beta r_rejected). At the reference both rewards are 0
    (2 ln 2); unlike DPO, raising both sides' log-probs by the same amount changes it (DPO sees only the margin)."""
    policy, tokens = torch.tensor(POLICY), torch.tensor(TOKENS)
    assert torch.allclose(pair_losses("bco_pair", 0.1, policy, tokens, policy)[0], torch.full((2,), 2 * math.log(2)))
    reference = torch.tensor(REFERENCE)
    shifted = policy + 3.0
    assert torch.allclose(pair_losses("sigmoid", 0.1, shifted, tokens, reference)[0],
                          pair_losses("sigmoid", 0.1, policy, tokens, reference)[0])
    assert not torch.allclose(pair_losses("bco_pair", 0.1, shifted, tokens, reference)[0],
                              pair_losses("bco_pair", 0.1, policy, tokens, reference)[0])
    p = policy.clone().requires_grad_()
    pair_losses("bco_pair", 0.1, p, tokens, reference)[0].sum().backward()
    assert (p.grad[:, 0] < 0).all() and (p.grad[:, 1] > 0).all()  # descent raises chosen, lowers rejected


def test_hinge_and_ipo_do_not_depend_on_the_reference_when_it_equals_the_policy():
    policy, tokens = torch.tensor(POLICY), torch.tensor(TOKENS)
    assert torch.allclose(pair_losses("sigmoid", 0.1, policy, tokens, policy)[0], torch.full((2,), math.log(2)))
    assert torch.allclose(pair_losses("hinge", 0.1, policy, tokens, policy)[0], torch.ones(2))
    assert torch.allclose(pair_losses("ipo", 0.1, policy, tokens, policy)[0], torch.full((2,), 25.0))


def pairs(n=8, seed=0, vocab=512) -> PairSet:
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()
    out = []
    for i in range(n):
        prompt = [1] + ids(5 + 3 * (i % 3))
        out.append(Pair(prompt, ids(2 + i % 4) + [2], ids(3 + (i * 5) % 4) + [2]))
    return PairSet(out)


def lora_module(tiny_models, random_b: bool):
    torch.manual_seed(0)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32),
                       PeftConfig(lora_rank=4, lora_alpha=8))
    if random_b:  # the policy then differs from the reference (the adapter switched off)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    return TrainModule(model), [p for p in model.parameters() if p.requires_grad]


def step_of(module, params, micro_batches, pref):
    module.model.zero_grad()
    loss, n, metrics = accumulate_preference(module, micro_batches, resolve_precision("float32", "cpu"), DistEnv(),
                                             PreferenceStep(pref, "adapter_off" if pref.loss_type not in
                                                            ("simpo", "orpo") else "none"))
    return loss, n, metrics, [p.grad.clone() for p in params]


def test_first_sigmoid_step_with_the_policy_at_the_reference_is_ln2(tiny_models):
    module, params = lora_module(tiny_models, random_b=False)  # lora_B = 0: policy = base = reference
    data = pairs()
    loss, n, metrics, grads = step_of(module, params, [PairCollator(0)(data.pairs)], PreferenceConfig())
    assert n == 8
    assert abs(loss - math.log(2)) < 1e-6
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0
    assert any(g.abs().sum() > 0 for g in grads)  # ln 2 is a slope, not a minimum


def test_bco_pair_steps_from_2ln2_and_accumulates_like_the_bigger_batch(tiny_models):
    """The trial loss through the preference step: 2 ln 2 where policy = reference, and micro batch 1 x 4 = 4."""
    module, params = lora_module(tiny_models, random_b=False)
    pref = PreferenceConfig(loss_type="bco_pair")
    loss, n, metrics, _ = step_of(module, params, [PairCollator(0)(pairs().pairs)], pref)
    assert n == 8 and abs(loss - 2 * math.log(2)) < 1e-6 and metrics["rewards/margins"] == 0.0
    module, params = lora_module(tiny_models, random_b=True)
    data, collate = pairs(4, seed=1), PairCollator(0)
    big = step_of(module, params, [collate(data.pairs)], pref)
    small = step_of(module, params, [collate([p]) for p in data.pairs], pref)
    assert big[0] == pytest.approx(small[0], rel=1e-6, abs=1e-6)
    for a, b in zip(big[3], small[3]):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("pref", [PreferenceConfig(), PreferenceConfig(loss_type="ipo"),
                                  PreferenceConfig(loss_type="hinge", rpo_alpha=0.5),
                                  PreferenceConfig(loss_type="orpo")], ids=["sigmoid", "ipo", "hinge+rpo", "orpo"])
def test_micro_batch_1_x_accumulation_4_equals_micro_batch_4(tiny_models, pref):
    module, params = lora_module(tiny_models, random_b=True)
    data = pairs(4, seed=1)
    collate = PairCollator(0)
    big = step_of(module, params, [collate(data.pairs)], pref)
    small = step_of(module, params, [collate([p]) for p in data.pairs], pref)
    assert big[1] == small[1] == 4
    assert big[0] == pytest.approx(small[0], rel=1e-6, abs=1e-6)
    for key in big[2]:
        assert big[2][key] == pytest.approx(small[2][key], rel=1e-6, abs=1e-5), key
    for a, b in zip(big[3], small[3]):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert big[2]["rewards/accuracies"] not in (0.0, 1.0) or pref.loss_type == "orpo"  # the pairs disagree


def test_packed_pairs_give_the_unpacked_loss_and_gradient(tiny_models):
    module, params = lora_module(tiny_models, random_b=True)
    data = pairs(6, seed=2)
    pref = PreferenceConfig(rpo_alpha=1.0)
    unpacked = step_of(module, params, [PairCollator(0)(data.pairs)], pref)
    rows = [data.pairs[:3], data.pairs[3:5], data.pairs[5:]]  # rows of 3, 2 and 1 pairs, padded at the end
    packed_batch = PackedPairCollator(0)(rows)
    assert packed_batch["input_ids"].shape[0] == 3 and "attention_mask" not in packed_batch
    packed = step_of(module, params, [packed_batch], pref)
    assert packed[0] == pytest.approx(unpacked[0], abs=1e-5)
    for key in unpacked[2]:
        assert packed[2][key] == pytest.approx(unpacked[2][key], abs=1e-4), key
    for a, b in zip(unpacked[3], packed[3]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_reference_is_the_model_with_the_adapter_off_in_eval_mode(tiny_models):
    module, _ = lora_module(tiny_models, random_b=True)
    batch = PairCollator(0)(pairs(3).pairs)
    step = PreferenceStep(PreferenceConfig(), "adapter_off")
    ref = step.reference(module, batch, "train")
    base = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32)
    with torch.no_grad():
        want, _ = TrainModule(base)(batch)
    assert torch.allclose(ref, want.view(2, -1).t(), atol=1e-5)
    assert module.training  # the reference pass left training mode as it found it
    policy, _ = module(batch)
    assert not torch.allclose(policy.view(2, -1).t(), ref, atol=1e-3)  # the adapter is back on


@pytest.mark.parametrize("chunk", [1, 7, 0, 1024])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_head_log_probs_equal_autograd(chunk, bias, autocast):
    """HeadLogProbs (the chunked head of sequence_logps) gives log_softmax(hidden @ W.T + b) at the targets and the
    gradients of hidden states, head weight and bias of plain autograd: to fp32 rounding, and to bf16 rounding under
    bf16 autocast (both sides then run their matmuls in bf16). Chunks of 1 and 7 rows run 23 and 4 chunks of the 23
    rows; 0 and 1024 run one."""
    from tuneforge.models.preference import HeadLogProbs

    g = torch.Generator().manual_seed(0)
    rows, dim, vocab = 23, 16, 50
    hidden = torch.randn(rows, dim, generator=g, requires_grad=True)
    head = torch.nn.Linear(dim, vocab, bias=bias)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)  # a different gradient per row, as the pair losses give
    params = [hidden, *head.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = head(hidden).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        ours = HeadLogProbs.apply(hidden, head.weight, head.bias, targets, chunk)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    our_grads = torch.autograd.grad((ours * upstream).sum(), params)
    assert ours.dtype == ref.dtype == torch.float32  # the softmax runs in fp32 either way
    assert torch.allclose(ours, ref, rtol=1e-6, atol=2e-6)  # the same logits (bf16 ones under autocast)
    tol = 2e-2 if autocast else 1e-5  # bf16: the weight gradient sums bf16 products over chunks, autograd in one
    for a, b in zip(our_grads, ref_grads):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()))
