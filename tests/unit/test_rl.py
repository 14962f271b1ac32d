"""Online RL (GRPO and its loss family), in process: the reward functions (built-in, a user's by import path, and the
ways a user's can be wrong), the rl section's rules, the loss by hand, micro-batch x accumulation = one big batch on
fixed completions, the advantages, and the sampler being the policy (its log-probs are the training forward's)."""
import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, STORIES
from tuneforge.config import load_config
from tuneforge.config.rules import check_world
from tuneforge.config.rules.rl import reward_name, rl_reference_kind
from tuneforge.config.schema import PeftConfig, RewardSpec
from tuneforge.data.prompts import prepare_prompts
from tuneforge.distributed import DistEnv, TrainModule
from tuneforge.errors import UserError
from tuneforge.eval.rewards import load_rewards, score
from tuneforge.eval.rollout import stop_token_ids
from tuneforge.models.load import resolve_precision
from tuneforge.models.policy import completion_logps, micro_batch_loss, token_losses
from tuneforge.peft import apply_peft
import tuneforge.train.grpo as grpo
from tuneforge.train.grpo import GRPOObjective, Rollout, accumulate_policy

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)

PROMPTS = REPO / "tests/fixtures/rl_prompts.jsonl"
FIXTURE = "tests.fixtures.rl_rewards"
FP32, ENV = resolve_precision("float32", "cpu"), DistEnv()


def recipe(*overrides: str, world_size: int = 1):
    """The tiny RL recipe (stories260K LoRA, prompts of tests/fixtures/rl_prompts.jsonl, a length reward)."""
    raw = {"run": {"name": "rl", "output_dir": "/tmp/unused", "seed": 1},
           "model": {"name_or_path": str(STORIES), "dtype": "float32"},
           "peft": {"method": "lora", "lora_rank": 8, "lora_alpha": 16, "target_modules": "all-linear"},
           "data": {"train": {"path": str(PROMPTS), "format": "prompt"}, "seq_length": 64},
           "train": {"micro_batch_size": 4, "global_batch_size": 8},
           "logging": {"tensorboard": False, "progress": False},
           "rl": {"num_generations": 4, "max_completion_length": 12, "rewards": [{"function": "length", "target": 20}]}}
    return load_config(raw, list(overrides), world_size=world_size)


# ---- reward functions --------------------------------------------------------------------------------------------
def scores(spec: RewardSpec, completions, columns, prompts=None, ids=None):
    fn, = load_rewards([spec])
    prompts = prompts or ["Q:"] * len(completions)
    ids = ids or [[5] * len(c) for c in completions]
    return score([fn], prompts, completions, ids, columns)[0]


def test_squad_rewards_read_the_first_line_against_every_gold_answer():
    completions = ["  Paris\nand more text", "the city of Paris", "London", "Paris"]
    columns = [{"answers": ["Paris", "paris, France"]}, {"answers": ["Paris"]}, {"answers": ["Paris"]},
               {"answers": {"text": ["Rome", "Paris"], "answer_start": [0, 9]}}]  # the Hub's layout too
    # F1 of "city of paris" (the article dropped) against "paris": precision 1/3, recall 1
    assert scores(RewardSpec("squad_f1"), completions, columns) == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert scores(RewardSpec("squad_em"), completions, columns) == [1.0, 0.0, 0.0, 1.0]


def test_exact_match_regex_and_length_rewards():
    got = scores(RewardSpec("exact_match", column="answer"), ["The Cat.", " cat", "a dog"],
                 [{"answer": "cat"}, {"answer": "a cat"}, {"answer": "cat"}])
    assert got == [1.0, 1.0, 0.0]  # normalised as SQuAD does: case, punctuation and articles
    rx = RewardSpec("regex", pattern=r"<a>.*</a>")
    assert scores(rx, ["  <a>x\ny</a> \n", "<a>x</a> and more", "say <a>x</a>"], [{}] * 3) == [1.0, 0.0, 0.0]
    assert scores(RewardSpec("length", target=10), ["x" * 10, "x" * 5, "x" * 14, "x" * 25], [{}] * 4) == \
        pytest.approx([1.0, 0.5, 0.6, 0.0])


def test_a_users_reward_by_import_path_gets_trls_arguments():
    spec = RewardSpec(f"{FIXTURE}:echo_lengths", weight=2.0)
    fn, = load_rewards([spec])
    assert (fn.name, fn.weight, reward_name(spec)) == ("echo_lengths", 2.0, "echo_lengths")
    got = score([fn], ["a", "b"], ["x y", "z"], [[7, 8, 9], [4]], [{"id": "p0", "other": 1}, {"id": "p3", "other": 2}])
    assert got == [[3.5, 1.0]]  # completion_ids' lengths, + 0.5 from the record's `id` column
    fn, = load_rewards([RewardSpec(f"{FIXTURE}:says_once", name="once")])
    assert fn.name == "once"
    assert score([fn], ["a"] * 3, ["Once upon", "no", "two words"], [[1]] * 3, [{}] * 3) == [[1.0, None, 0.0]]


BAD_REWARDS = [
    ("wrong_count", "returned 5 values for 4 completions; expected one float (or None) per completion"),
    ("raises", "raised ValueError: reward server unreachable"),
    ("not_a_number", "value 0 is str ('high'); expected a float or None"),
    ("missing_column", "reads column 'solution', which the data does not have (columns: answer, id)"),
    ("infinite", "value 0 is inf; expected a finite float or None"),
]


@pytest.mark.parametrize("function,message", BAD_REWARDS, ids=[b[0] for b in BAD_REWARDS])
def test_a_bad_reward_is_refused_in_one_line_naming_it(function, message):
    fn, = load_rewards([RewardSpec("length", target=5), RewardSpec(f"{FIXTURE}:{function}")])[1:]
    with pytest.raises(UserError) as e:
        score([fn], ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, [{"answer": "x", "id": "i"}] * 4)
    text = str(e.value)
    assert text == f"rl.rewards[1] ({FIXTURE}:{function}): {message}"
    assert "\n" not in text and "second line" not in text


@pytest.mark.parametrize("spec,message", [
    (RewardSpec("exact_match", column="solution"), "rl.rewards[0] (exact_match): reads column 'solution', which the "
                                                   "data does not have (columns: id)"),
    (RewardSpec("squad_f1"), "rl.rewards[0] (squad_f1): reads column 'answers'"),
])
def test_a_built_in_reward_on_data_without_its_column_is_refused(spec, message):
    with pytest.raises(UserError) as e:
        scores(spec, ["a"], [{"id": "p0"}])
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("function,message", [
    ("tests.fixtures.no_such_module:score", "cannot import module 'tests.fixtures.no_such_module' "
                                            "(ModuleNotFoundError: No module named 'tests.fixtures.no_such_module')"),
    (f"{FIXTURE}:no_such_function", f"module '{FIXTURE}' has no function 'no_such_function'"),
])
def test_a_reward_that_cannot_be_imported_is_refused_at_load(function, message):
    with pytest.raises(UserError) as e:
        load_rewards([RewardSpec(function)])
    assert str(e.value) == f"rl.rewards[0] ({function}): {message}"


def test_a_record_column_named_like_a_built_ins_option_leaves_it_working():
    assert scores(RewardSpec("length", target=5), ["hello"], [{"target": "the gold answer"}]) == [1.0]


# ---- the rl section's rules ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["rl.num_generations=1"], "rl.num_generations: must be >= 2 (advantages compare the completions of one prompt), "
                               "got 1"),
    (["train.global_batch_size=12", "rl.num_generations=8"],
     "train.global_batch_size (12) counts completions: it must be a multiple of rl.num_generations (8)"),
    (["rl.temperature=0"], "rl.temperature: must be > 0 (sampling), got 0"),
    (["rl.rewards=[{function: bleu}]"], "rl.rewards[0].function: unknown reward 'bleu'; expected one of squad_f1, "
                                        "squad_em, exact_match, regex, length or an import path (module:function)"),
    (["rl.rewards=[{function: length, target: 5}, {function: regex}]"], "rl.rewards[1].pattern: reward regex needs it"),
    (["rl.rewards=[{function: exact_match}]"], "rl.rewards[0].column: reward exact_match needs it"),
    (["rl.rewards=[{function: length, target: 5}, {function: 'm:length'}]"],
     "rl.rewards[1].name: 'length' is used twice; give each reward its own name"),
    (["rl.rewards=[]"], "rl.rewards: at least one reward function"),
    (["preference={loss_type: sigmoid}", f"data.train.path={REPO}/assets/data/squad_pairs/train.jsonl",
      "data.train.format=preference"], "rl: a recipe has one objective; remove the preference section or rl"),
    (["data.batching=packing"], "data.batching: rl batches its completions padded; use pad_longest"),
    (["rl.max_completion_length=64"], "rl.max_completion_length (64) leaves no room for a prompt in data.seq_length "
                                      "(64); raise seq_length"),
    (["rl.max_prompt_length=60"], "rl.max_prompt_length: expected 1 .. data.seq_length - max_completion_length (52)"),
    (["rl.top_p=0"], "rl.top_p: expected a value in (0, 1], got 0"),
    (["rl.beta=0.1", "rl.reference=adapter_off", "peft=null"],
     "rl.reference: adapter_off needs one adapter of lora, ia3 (this run trains full weights); use copy (auto "
     "picks it)"),
    (["data.train.format=text"], "data.train.format: rl samples completions of prompts; expected one of squad, "
                                 "input_output, alpaca, dolly, chat, prompt, got text"),
    (["rl=null"], "data.train.format: prompt data (prompts without answers) trains with an rl section"),
])
def test_bad_rl_sections_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        recipe(*overrides)
    assert str(e.value).startswith(f"<dict>: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_prompts_a_step_must_divide_among_processes():
    cfg = recipe("train.global_batch_size=8", "rl.num_generations=8")  # one prompt a step
    with pytest.raises(UserError, match=r"train.global_batch_size \(8\) / rl.num_generations \(8\) = 1 prompts a "
                                        r"step, not divisible by the data-parallel size \(2\)"):
        check_world(cfg, 2)
    check_world(recipe("train.global_batch_size=16", "rl.num_generations=8"), 2)  # two prompts: one each


def test_the_reference_a_run_gets():
    assert rl_reference_kind(recipe(), "single") == "none"  # beta 0: no KL term, no reference
    assert rl_reference_kind(recipe("rl.beta=0.04"), "single") == "adapter_off"
    assert rl_reference_kind(recipe("rl.beta=0.04", "peft=null"), "single") == "copy"
    assert rl_reference_kind(recipe("rl.beta=0.04", "rl.reference=copy"), "single") == "copy"


# ---- the loss, by hand ---------------------------------------------------------------------------------------------
# a step of three completions in two micro-batches (2 rows, then 1): per token (log pi, log pi_old, reference),
# and each completion's advantage. The ratios cross both clipping bounds on both signs of the advantage.
EPS, EPS_HIGH, MAX_LEN = 0.2, 0.28, 6
STEP = [
    [((-1.0, -1.5, -1.2), (-2.0, -1.5, -1.8), (-0.5, -0.6, -0.4)), 1.5],   # ratios 1.65 (clipped high), 0.61, 1.11
    [((-3.0, -2.5, -2.9), (-0.2, -0.6, -0.3)), -0.8],                      # 0.61 (clipped low), 1.49
    [((-1.1, -1.0, -1.3), (-0.9, -1.3, -1.0), (-2.2, -2.0, -2.1), (-0.7, -0.7, -0.7)), 0.3],  # 0.90, 1.49 (high)
]
MICRO_BATCHES = [[0, 1], [2]]


def hand_token(lp, old, ref, adv, beta, correction):
    """(loss, k3 KL estimate, clipped, d loss / d log pi) of one token; with `correction` the KL term is weighted by
    the ratio (rl.kl_ratio_correction)."""
    r = math.exp(lp - old)
    loss = -min(r * adv, min(max(r, 1 - EPS), 1 + EPS_HIGH) * adv)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    clipped = (r < 1 - EPS and adv < 0) or (r > 1 + EPS_HIGH and adv > 0)
    slope = 0.0 if clipped else -adv * r  # the surrogate's
    kl_slope = 1 - math.exp(ref - lp)
    if correction:
        return loss + beta * kl * r, kl, clipped, slope + beta * (kl_slope * r + kl * r)
    return loss + beta * kl, kl, clipped, slope + beta * kl_slope


def hand_step_loss(loss_type, beta, correction):
    per_row = [[hand_token(*t, adv, beta, correction)[0] for t in tokens] for tokens, adv in STEP]
    S, T = len(STEP), sum(len(r) for r in per_row)
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in per_row) / S
    if loss_type == "dapo":
        return sum(map(sum, per_row)) / T
    if loss_type == "dr_grpo":
        return sum(map(sum, per_row)) / (S * MAX_LEN)
    return sum(sum(sum(per_row[i]) for i in mb) / sum(len(per_row[i]) for i in mb)
               for mb in MICRO_BATCHES) / len(MICRO_BATCHES)  # bnpo: the mean of the micro-batches' token means


@pytest.mark.parametrize("beta,correction", [(0.0, True), (0.04, True), (0.04, False)],
                         ids=["beta0", "beta0.04", "beta0.04-no-ratio-on-kl"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_loss_and_its_gradient_equal_the_hand_computed_values(loss_type, beta, correction):
    T = sum(len(tokens) for tokens, _ in STEP)
    total, clipped_flags, kls, grads, slopes = 0.0, [], [], [], []
    for mb in MICRO_BATCHES:
        tokens = [(t, STEP[i][1], k) for k, i in enumerate(mb) for t in STEP[i][0]]
        logps, old, ref = torch.tensor([t for t, _, _ in tokens], dtype=torch.float64).unbind(1)
        logps = logps.clone().requires_grad_()
        adv = torch.tensor([a for _, a, _ in tokens], dtype=torch.float64)
        seq = torch.tensor([k for *_, k in tokens])
        losses, parts = token_losses(logps, old, adv, ref, EPS, EPS_HIGH, beta, kl_ratio_correction=correction)
        share = micro_batch_loss(loss_type, losses, seq, len(mb), len(STEP), T, len(tokens), len(MICRO_BATCHES),
                                 MAX_LEN, 1)
        share.backward()
        total += share.item()
        grads += logps.grad.tolist()
        clipped_flags += parts["region"].tolist()
        kls += parts["kl"].tolist() if beta else []
        for j, (values, a, _) in enumerate(tokens):
            _, kl, clipped, slope = hand_token(*values, a, beta, correction)
            assert parts["low"][j].item() == float(clipped and a < 0)
            assert parts["high"][j].item() == float(clipped and a > 0)
            slopes.append((slope, kl, clipped))
    assert total == pytest.approx(hand_step_loss(loss_type, beta, correction), abs=1e-12)
    assert clipped_flags == [float(c) for _, _, c in slopes] and sum(clipped_flags) == 3  # both bounds active
    if beta:
        assert kls == pytest.approx([kl for _, kl, _ in slopes], abs=1e-12)
    else:
        assert [g for g, (_, _, c) in zip(grads, slopes) if c] == [0.0, 0.0, 0.0]  # a clipped token: no gradient
    # each token's gradient: its slope times its weight in the step's normalisation
    rows = [i for mb in MICRO_BATCHES for i in mb for _ in STEP[i][0]]
    mb_tokens = [sum(len(STEP[i][0]) for i in mb) for mb in MICRO_BATCHES for i in mb for _ in STEP[i][0]]
    weight = {"grpo": lambda i, n: 1 / (len(STEP[i][0]) * len(STEP)), "dapo": lambda i, n: 1 / T,
              "dr_grpo": lambda i, n: 1 / (len(STEP) * MAX_LEN),
              "bnpo": lambda i, n: 1 / (n * len(MICRO_BATCHES))}[loss_type]
    want = [s * weight(i, n) for (s, _, _), i, n in zip(slopes, rows, mb_tokens)]
    assert grads == pytest.approx(want, abs=1e-12)


# ---- the step on fixed completions ---------------------------------------------------------------------------------
def policy(std=0.05, seed=0):
    """stories260K in fp32 with a LoRA whose B is not 0: the policy then differs from the adapter switched off."""
    torch.manual_seed(seed)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32),
                       PeftConfig(lora_rank=8, lora_alpha=16, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=std)
    return TrainModule(model), [p for p in model.parameters() if p.requires_grad]


def fixed_rollout(tok, prompts=("Once upon a time", "Tom and Sue went to the park"), G=2, seed=0) -> Rollout:
    """G completions of each prompt (prompts of 5 and 8 tokens), of 3 to 9 tokens, some ending in eos; the last one
    truncated and masked (mask_truncated_completions), so a step's rows are neither equally long nor all counted."""
    g = torch.Generator().manual_seed(seed)
    rows, prompt_lens, counted, logps = [], [], [], []
    n = len(prompts) * G
    for k in range(n):
        ids = tok(prompts[k // G])["input_ids"]
        completion = torch.randint(3, 512, (3 + (5 * k) % 7,), generator=g).tolist() + ([2] if k % 2 else [])
        rows.append(ids + completion)
        prompt_lens.append(len(ids))
        counted.append(k != n - 1)
        logps.append([0.0] * len(completion))
    return Rollout(rows=rows, prompt_lens=prompt_lens, counted=counted, advantages=torch.randn(n, generator=g),
                   sampling_logps=logps, metrics={}, texts=[], groups=[k // G for k in range(n)])


def step_grads(module, params, cfg, rollout, tok, shared_prefix=False):
    obj = GRPOObjective(cfg)
    obj.tokenizer, obj.shared_prefix = tok, shared_prefix
    module.model.zero_grad()
    loss, n, metrics = accumulate_policy(module, rollout, obj.micro_batches(rollout), cfg.rl, FP32, ENV,
                                         obj._reference(module))
    return loss, n, metrics, [p.grad.clone() for p in params]


def assert_same_grads(a, b, rel):
    scale = max(g.abs().max().item() for g in a)
    assert scale > 0
    worst = max((x - y).abs().max().item() for x, y in zip(a, b))
    assert worst <= rel * scale, f"largest gradient difference {worst:.3e} of {scale:.3e}"


# fp64: the split changes nothing but rounding (measured: <= 2.1e-15 of the largest gradient). fp32: the shapes of
# the matmuls and the padding differ, and so does the rounding (measured: 0.6e-6 .. 4.5e-6); a normalisation that
# depended on the split would be off by 1e-3 or more (bnpo below). The shared-prefix layout (each prompt's forward
# once for its group, the completions on its cache) against whole rows one at a time: the LM head's softmax is fp32
# whatever the model's dtype, so fp32 rounding shows even in fp64 (measured: 8e-8).
# fp32: rounding of differently shaped matmuls, up to 2.3e-5 of the largest gradient with ATEN_CPU_CAPABILITY=avx2
# (measured): 1e-4; fp64 shows the normalisation itself is exact
INVARIANCE = [*((lt, beta, torch.float32, False, 1e-4) for lt in ("grpo", "dapo", "dr_grpo") for beta in (0.0, 0.04)),
              *((lt, 0.04, torch.float64, False, 1e-12) for lt in ("grpo", "dapo", "dr_grpo")),
              ("dapo", 0.04, torch.float32, True, 1e-4), ("grpo", 0.0, torch.float64, True, 1e-6)]


@pytest.mark.parametrize("loss_type,beta,dtype,shared_prefix,rel", INVARIANCE,
                         ids=[f"{c[0]}-beta{c[1]}-{str(c[2])[6:]}{'-shared' if c[3] else ''}" for c in INVARIANCE])
def test_micro_batch_1_x_accumulation_4_equals_micro_batch_4(tok, loss_type, beta, dtype, shared_prefix, rel):
    """On the same completions (of unequal lengths, one masked), both iterations of a generation (num_iterations 2:
    the second has ratios != 1, some clipped) give the same loss, metrics and gradients however the step is split."""
    module, params = policy()
    module.to(dtype)
    start = [p.detach().clone() for p in params]
    runs = {}
    for micro in (4, 1):
        cfg = recipe(f"train.micro_batch_size={micro}", "train.global_batch_size=4", "rl.num_generations=2",
                     f"rl.loss_type={loss_type}", f"rl.beta={beta}", "rl.num_iterations=2", "rl.epsilon_high=0.28",
                     "rl.temperature=0.8")
        rollout = fixed_rollout(tok)
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        shared = shared_prefix and micro > 1
        first = step_grads(module, params, cfg, rollout, tok, shared)
        with torch.no_grad():  # the weights move between the iterations: ratios leave 1, some beyond the clip
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=dtype) * 0.02)
        second = step_grads(module, params, cfg, rollout, tok, shared)
        runs[micro] = (first, second)
    for it in (0, 1):
        big, small = runs[4][it], runs[1][it]
        assert big[1] == small[1] == 4
        for key in ("entropy", "clip_ratio/region_mean", "kl"):  # the log-probs and their sums are fp32 (the LM
            if key in big[2]:                                      # head's softmax) whatever the model's dtype
                assert big[2][key] == pytest.approx(small[2][key], rel=max(rel, 1e-5)), key
        assert big[0] == pytest.approx(small[0], rel=max(rel, 1e-5), abs=1e-7)
        assert_same_grads(big[3], small[3], rel)
    assert runs[4][0][2]["clip_ratio/region_mean"] == 0  # the first iteration's ratios are 1
    assert runs[4][1][2]["clip_ratio/region_mean"] > 0.2  # the second clips some tokens
    assert ("kl" in runs[4][0][2]) == bool(beta) and (not beta or runs[4][0][2]["kl"] > 0)


def test_bnpo_is_dapo_with_one_micro_batch_and_depends_on_the_split(tok):
    """bnpo is TRL's: each micro-batch's token mean, averaged over the micro-batches. So it equals dapo (every token
    of the step counts once) when the step is one micro-batch, and not when the split gives micro-batches of
    different token counts: it cannot be split-invariant, by definition (dapo is the invariant form)."""
    module, params = policy()
    one = {lt: step_grads(module, params, recipe("train.micro_batch_size=4", "train.global_batch_size=4",
                                                 "rl.num_generations=2", f"rl.loss_type={lt}"),
                          fixed_rollout(tok), tok) for lt in ("bnpo", "dapo")}
    assert one["bnpo"][0] == one["dapo"][0]
    assert all(torch.equal(a, b) for a, b in zip(one["bnpo"][3], one["dapo"][3]))
    split = step_grads(module, params, recipe("train.micro_batch_size=1", "train.global_batch_size=4",
                                              "rl.num_generations=2", "rl.loss_type=bnpo"), fixed_rollout(tok), tok)
    worst = max((a - b).abs().max().item() for a, b in zip(split[3], one["bnpo"][3]))
    assert worst > 1e-3 * max(g.abs().max().item() for g in split[3])


def test_a_completion_that_counts_for_nothing_has_no_labels(tok):
    cfg = recipe("train.micro_batch_size=4", "train.global_batch_size=4", "rl.num_generations=2")
    obj = GRPOObjective(cfg)
    obj.tokenizer = tok
    rollout = fixed_rollout(tok)
    mb, = obj.micro_batches(rollout)
    labelled = (mb["labels"] != -100).sum(1).tolist()
    assert labelled == [len(r) - p if c else 0 for r, p, c in zip(rollout.rows, rollout.prompt_lens, rollout.counted)]
    assert labelled[-1] == 0 and all(labelled[:-1])


# ---- advantages --------------------------------------------------------------------------------------------------
def generate_fixed(cfg, tok, completions, truncated=None):
    """GRPOObjective.generate on the first prompts of the fixture with the sampler replaced: these completions."""
    obj = GRPOObjective(cfg)
    obj.tokenizer, obj.stop_ids = tok, {2}
    prompts = prepare_prompts(cfg.data, cfg.rl, tok)[0].examples[:len(completions) // cfg.rl.num_generations]

    def fixed(module, prompts, numbers, settings, precision, env, step, batch_size):
        rows = [(p, j) for p in prompts for j in range(numbers)]
        return rows, completions, [[0.0] * len(c) for c in completions], truncated or [False] * len(rows)
    obj._sample = fixed
    return obj.generate(None, prompts, FP32, ENV, 0), prompts


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_the_reward_less_its_group_mean_over_the_chosen_std(tok, scale):
    """Two rewards, weighted and summed; a None from one of them adds nothing to the sum (TRL's nansum)."""
    cfg = recipe("train.global_batch_size=8", "rl.num_generations=4", f"rl.scale_rewards={scale}",
                 f"rl.rewards=[{{function: '{FIXTURE}:echo_lengths'}}, "
                 f"{{function: '{FIXTURE}:says_once', weight: 2.0}}]")
    texts = [" once upon", " a b c", " once", "x", " tom said once", " the", " big dog", " once more"]
    completions = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rollout, prompts = generate_fixed(cfg, tok, completions)  # prompts p0 and p1
    once = [1.0, 0.0, 1.0, None, 1.0, None, 0.0, 1.0]  # "the"/"x": no space, not scored by says_once
    rewards = [len(c) + (0.5 if k < 4 else 0.0) + 2.0 * (o or 0.0) for k, (c, o) in enumerate(zip(completions, once))]
    r = torch.tensor(rewards, dtype=torch.float64).view(2, 4)
    centred = (r - r.mean(1, keepdim=True)).view(-1)
    std = {"group": r.std(1).repeat_interleave(4), "batch": r.view(-1).std().expand(8), "none": None}[scale]
    want = centred if std is None else centred / (std + 1e-4)
    assert torch.allclose(rollout.advantages.double(), want, atol=1e-5)
    assert rollout.metrics["reward"] == pytest.approx(sum(rewards) / 8, rel=1e-6)
    assert rollout.metrics["rewards/says_once/mean"] == pytest.approx(4 / 6)
    assert rollout.metrics["rewards/echo_lengths/mean"] == pytest.approx(
        sum(len(c) for c in completions) / 8 + 0.25, rel=1e-6)
    assert rollout.metrics["completions/mean_length"] == pytest.approx(sum(map(len, completions)) / 8)
    assert rollout.rows[0] == prompts[0].ids + completions[0] and rollout.prompt_lens[5] == len(prompts[1].ids)


def test_a_completion_no_reward_scores_is_left_out_and_truncated_ones_can_count_for_nothing(tok):
    cfg = recipe("train.global_batch_size=4", "rl.num_generations=4", "rl.mask_truncated_completions=true",
                 f"rl.rewards=[{{function: '{FIXTURE}:says_once'}}]")
    texts = [" once upon", " a b", " once more", "x"]  # 1, 0, 1 and None
    completions = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rollout, _ = generate_fixed(cfg, tok, completions, truncated=[False, True, False, False])
    mean, std = 2 / 3, torch.tensor([1.0, 0.0, 1.0]).std().item()  # of the three scored
    want = [(1 - mean) / (std + 1e-4), -mean / (std + 1e-4), (1 - mean) / (std + 1e-4), 0.0]
    assert rollout.advantages.tolist() == pytest.approx(want, abs=1e-5)
    assert rollout.metrics["reward"] == pytest.approx(mean) and rollout.metrics["completions/clipped_ratio"] == 0.25
    assert rollout.counted == [True, False, True, True]


def test_a_group_of_equal_rewards_has_zero_advantage_and_counts_as_zero_std(tok):
    cfg = recipe("train.global_batch_size=8", "rl.num_generations=4", "rl.rewards=[{function: length, target: 3}]")
    completions = [[300, 301, 302]] * 4 + [[300], [300, 301], [300, 301, 302], [300, 2]]
    rollout, _ = generate_fixed(cfg, tok, completions)
    assert rollout.advantages[:4].tolist() == [0.0] * 4 and rollout.advantages[4:].abs().min() > 0.1
    assert rollout.metrics["frac_reward_zero_std"] == 0.5


# ---- the sampler is the policy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,extra,shared_prefix", [(1.0, [], False),
                                                             (0.7, ["rl.top_k=50", "rl.top_p=0.9"], True)],
                         ids=["t1-rows", "t0.7-topk-topp-shared"])
def test_the_samplers_log_probs_are_the_training_forwards(tok, temperature, extra, shared_prefix, monkeypatch):
    """With num_iterations 1 in fp32: the log-prob the sampler records for each token (cached decode of a
    left-padded batch) against the training forward's (right-padded micro-batches, the LM head on completion
    positions), and both against an fp64 forward of each row alone. On stories260K the two fp32 paths differ by up
    to ~5e-5 (768 tokens, |log p| up to 11), as much as either differs from fp64: rounding of an fp32 forward, not
    a mismatch of distributions (a wrong temperature, position or mask would be off by 1e-2 or more). And every
    importance ratio of the first iteration is exactly 1. Sampling and training each run whole rows, or each prompt
    once for its group (the shared prefix)."""
    cfg = recipe("train.micro_batch_size=4", "train.global_batch_size=16", f"rl.temperature={temperature}",
                 "rl.max_completion_length=24", *extra)
    module, params = policy()
    obj = GRPOObjective(cfg)
    obj.tokenizer, obj.stop_ids, obj.shared_prefix = tok, stop_token_ids(tok, module), shared_prefix
    prompts = prepare_prompts(cfg.data, cfg.rl, tok)[0].examples[:4]
    rollout = obj.generate(module, prompts, FP32, ENV, 0)
    assert len(rollout.rows) == 16 and sum(map(len, rollout.sampling_logps)) > 200
    sampled = torch.tensor([lp for k, lps in enumerate(rollout.sampling_logps) if rollout.counted[k] for lp in lps],
                           dtype=torch.float64)
    ratios = []
    real = grpo.token_losses

    def spy(logps, old, *args):
        ratios.append(torch.exp(logps - old).detach())
        return real(logps, old, *args)
    monkeypatch.setattr(grpo, "token_losses", spy)
    _, _, metrics = accumulate_policy(module, rollout, obj.micro_batches(rollout), cfg.rl, FP32, ENV, None)
    assert len(ratios) == 4 and all(torch.equal(r, torch.ones_like(r)) for r in ratios)
    with torch.no_grad():
        trained = torch.cat([completion_logps(module.model, {k: v for k, v in mb.items() if k != "first"})[0]
                             for mb in obj.micro_batches(rollout)]).double()
        exact_model = copy.deepcopy(module.model).double()
        exact = []
        for row, start in zip(rollout.rows, rollout.prompt_lens):
            logp = (exact_model(input_ids=torch.tensor([row])).logits[0] / temperature).log_softmax(-1)
            exact += [logp[t - 1, row[t]].item() for t in range(start, len(row))]
        exact = torch.tensor(exact, dtype=torch.float64)
    gap = (sampled - trained).abs().max().item()
    assert metrics["sampling/logp_diff_max"] == pytest.approx(gap, rel=1e-3)  # what the run reports
    sampler_error, training_error = (sampled - exact).abs().max().item(), (trained - exact).abs().max().item()
    assert gap <= 1e-4 and (sampled - trained).abs().mean().item() <= 5e-6, gap
    assert sampler_error <= 2 * training_error + 5e-6, (sampler_error, training_error)
