"""Online RL (GRPO and its loss family), side by side: tuneforge's own loop (tuneforge.train.recipe.finetune with the
rl section) against TRL 1.16's GRPOTrainer, on the SAME prompts, completions, rewards and starting weights, each side in
its own process, both in one invocation. Parity only (no speed section).

    pip install --no-deps trl==1.16.0          # the other side; tuneforge itself does not need it
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_grpo.py [--out RESULTS.json] \\
        [--work /tmp/tuneforge-bench-grpo] [--losses grpo,dapo,dr_grpo,bnpo] [--betas 0,0.04] [--iterations 1,2] \\
        [--trl-python PYTHON] [--trl-path DIR] [--kl-without-correction]

    e.g. with TRL unpacked at /tmp/trlpkgs (24 configurations, ~70 s on 2 cores):
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_grpo.py --trl-path /tmp/trlpkgs --kl-without-correction

(--trl-python: the TRL side's interpreter, e.g. a virtualenv holding trl 1.16.0 with the same torch, transformers and
peft, as in benchmarks/bench_dpo.py; default this one. With TRL unpacked outside site-packages, e.g. at /tmp/trlpkgs,
put it on the TRL side's path with --trl-path /tmp/trlpkgs, which prepends it to that process's PYTHONPATH only.)

The requirement checked: on the same prompts, the same completions (generated once, fed to both sides), the same
rewards and weights, in fp32, the per-step loss and the pre-clip gradient norm of the two sides agree within 1e-4 for
5 optimizer steps, for loss_type grpo, dapo, dr_grpo and bnpo, with beta 0 and 0.04, with num_iterations 1 and 2
(16 configurations, each a 5-step run per side), all with both sides' defaults for the KL term: tuneforge
rl.kl_ratio_correction true, TRL use_bias_correction_kl True. With --kl-without-correction, also for the 8 beta 0.04
configurations (the --losses x --iterations of beta 0.04) with that flag false on both sides: 24 configurations, all
required. Every configuration passes ONE flag to both sides (rl.kl_ratio_correction = use_bias_correction_kl).

What is run (fp32 on CPU, no autocast, everything seeded)
  model      assets/models/stories260K (a 260K-parameter Llama, tied embeddings) with LoRA r 8 / alpha 16 /
             dropout 0 on all linear layers (peft's "all-linear": the LM head is not adapted). Both sides start from
             ONE adapter made here (peft get_peft_model after torch.manual_seed(0): A from peft's init; B drawn
             N(0, 0.02) from a seeded generator, NOT zero, so the starting model differs from the base model and the
             reference of beta 0.04 must be the starting adapter, not the base). tuneforge gets it as model.init_from
             (its rl.reference auto is then `copy`: a frozen copy of the starting model); TRL gets a PeftModel loaded
             from it (GRPOTrainer copies it into a frozen "ref" adapter, its reference, when beta != 0).
  prompts    tests/fixtures/rl_prompts.jsonl (format prompt: 16 story openings), in FILE ORDER (tuneforge
             data.shuffle false; TRL shuffle_dataset=False, whose RepeatSampler then walks the prompts in order).
             A generation takes the next 4 prompts (wrapping round after 16), each repeated num_generations = 4
             times, rows grouped by prompt. Prompt token ids are tuneforge's (tokenizer with special tokens: BOS +
             text); the TRL side checks that its own tokenization of every prompt it is given is the same ids.
  completions generated ONCE, before either side runs (--child prepare): with the starting model (base + the
             adapter), tuneforge.eval.rollout.sample at temperature 1.0, at most max_completion_length 16 tokens,
             a random stream per completion (seed, generation, prompt, number), stopping at eos (id 2) OR at the
             first "." token (id 426), the stop token kept in the completion. (stories260K writes long stories and
             does not emit eos within 16 tokens: stopping at eos alone gives 16 tokens every time, and with equal
             lengths grpo, dapo, dr_grpo and bnpo normalise alike. Stopping at the first sentence gives 1 to 16
             tokens, about a third cut at 16, so the four normalisations differ.) The "." stays in the text the
             reward reads on both sides (only eos is left out). Written to WORK/completions.json: for each generation
             g its prompt indices, prompt ids, the 16 completions' ids, the sampler's log-probs, truncation flags and
             texts. Generation g serves steps
             g*num_iterations .. g*num_iterations + num_iterations - 1 on both sides: 5 generations (20 prompts) with
             num_iterations 1, 3 with num_iterations 2.
             tuneforge: GRPOObjective._sample is replaced (in the tuneforge side's process) by a function returning
             generation step // num_iterations's rows, completions, log-probs and truncation flags, after checking
             that the prompts it is asked for are that generation's (indices and ids).
             TRL: GRPOTrainer._generate_single_turn is replaced by one returning the same completion ids (logprobs
             None, as TRL's own transformers path returns), after checking the prompt ids it is given (each prompt
             num_generations times, in order). TRL shuffles a generation batch's rows before splitting it into
             micro-batches (trl.trainer.grpo_trainer.shuffle_sequence_dict, a torch.randperm); that is replaced by
             the identity on the TRL side, so that micro-batch k holds rows [8k, 8k+8) on both sides (it only
             matters for bnpo, whose normaliser is each micro-batch's token count; the other losses normalise over
             the whole step). Both sides write the prompt indices they trained on, per generation, and the
             benchmark checks they are the same lists in the same order.
  rewards    one reward, the length of the completion's text: 1 - |len(text) - 20| / 20, floored at 0 (tuneforge's
             built-in `length` with target 20; on the TRL side a plain Python function with the same formula),
             weight 1, on the text each side decodes (skip_special_tokens; the eos token dropped). Advantages:
             reward - its group's mean, divided by the group's std (Bessel) + 1e-4 (scale_rewards group).
  batches    4 prompts x 4 completions = 16 completions a step: tuneforge micro_batch_size 8, global_batch_size 16
             (accumulation 2); TRL per_device_train_batch_size 8, gradient_accumulation_steps 2 (generation batch 16,
             steps_per_generation 2).
  loss       epsilon 0.2 (epsilon_high = epsilon), temperature 1.0, importance sampling per token, KL k3 estimator
             of KL(pi || ref) with weight beta. The KL term: with the flag true (the default of both: tuneforge
             rl.kl_ratio_correction, models/policy.py token_losses; TRL use_bias_correction_kl) the per-token k3 term
             is multiplied by the ratio r = pi / pi_old (the unbiased reverse-KL gradient; r is differentiable, so
             this changes the gradient even at a generation's first step, where r = 1); with the flag false
             (--kl-without-correction) it is the k3 term alone, on both sides. With beta 0 there is no KL term and
             the flag changes nothing (it is passed all the same).
             grpo: mean over completions of each one's token mean; dapo: token sum / the step's tokens; dr_grpo:
             token sum / (completions x 16); bnpo: mean over micro-batches of each micro-batch's token mean (TRL's,
             per micro-batch by design).
  optimizer  AdamW fused (tuneforge train.optimizer fused true; TRL optim adamw_torch_fused), lr 1e-3, betas
             (0.9, 0.999), eps 1e-8, weight decay 0, constant lr, no warmup, grad-norm clip 1.0; 5 optimizer steps.

What is compared, per configuration and per step: `loss` (tuneforge's metrics.jsonl "loss": the sum over the step's
micro-batches of their shares = the step's loss; TRL's logged "loss" with logging_steps 1: the sum of the
micro-batch losses, each already divided as its loss_type says) and `grad_norm` (both the global norm BEFORE clipping:
tuneforge's train_step / TRL's Trainer log). Pass: both within 1e-4 absolute at every one of the 5 steps. Also, not
part of pass/fail: `reward` (mean reward of the generation the step used; TRL logs it on generating steps only),
the advantages of every generation (as each side computed them), the decoded completion texts, and the prompt order.
`kl` is written for both sides but not compared: tuneforge logs the k3 estimate itself, TRL logs it multiplied by the
ratio when use_bias_correction_kl is True (the same values where r = 1, i.e. at a generation's first step).
The script prints a markdown section and writes every per-step number of both sides, the prompt orders and the
advantages to --out (default WORK/results.json)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.side_by_side import publish

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STORIES = REPO / "assets" / "models" / "stories260K"
PROMPTS = REPO / "tests" / "fixtures" / "rl_prompts.jsonl"
STEPS, PROMPTS_PER_STEP, GENERATIONS_PER_PROMPT, MICRO, ACCUM = 5, 4, 4, 8, 2
LR, MAX_COMPLETION, TEMPERATURE, EPSILON, SEED, TARGET = 1e-3, 16, 1.0, 0.2, 0, 20
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
LORA_B_STD = 0.02
LOSSES, BETAS, ITERATIONS = ("grpo", "dapo", "dr_grpo", "bnpo"), (0.0, 0.04), (1, 2)
TOL = 1e-4


def child_env(extra_path: str | None = None) -> dict:
    path = os.pathsep.join(x for x in (str(REPO), extra_path, os.environ.get("PYTHONPATH")) if x)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def config_name(c: dict) -> str:
    """grpo-beta0.04-it2, with -nokl-corr where the KL ratio correction is off (both sides); as grpo_trl_side.py"""
    return f"{c['loss_type']}-beta{c['beta']:g}-it{c['num_iterations']}" + \
        ("" if c["kl_ratio_correction"] else "-nokl-corr")


def generations_needed(configs: list[dict]) -> int:
    return max(math.ceil(STEPS / c["num_iterations"]) for c in configs)


# ---- the tuneforge recipe ------------------------------------------------------------------------------------------
def recipe(work: Path, c: dict, adapter: Path | None) -> dict:
    return {
        "run": {"name": config_name(c), "output_dir": str(work / "runs"), "seed": SEED},
        "model": {"name_or_path": str(STORIES), "dtype": "float32",
                  **({"init_from": str(adapter)} if adapter else {})},
        "peft": {"method": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"],
                 "lora_dropout": LORA["dropout"], "target_modules": LORA["target_modules"]},
        "data": {"train": {"path": str(PROMPTS), "format": "prompt"}, "validation": None, "seq_length": 128,
                 "shuffle": False, "cache_dir": str(work / "cache")},
        "train": {"micro_batch_size": MICRO, "global_batch_size": MICRO * ACCUM, "max_steps": STEPS,
                  "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                "eps": 1e-8, "fused": True},
                  "lr_scheduler": {"name": "constant", "warmup_steps": 0}, "grad_clip": 1.0,
                  "log_every_steps": 1},
        "checkpoint": {"every_steps": None, "resume": "never"},
        "logging": {"tensorboard": False, "progress": False},
        "rl": {"num_generations": GENERATIONS_PER_PROMPT, "max_completion_length": MAX_COMPLETION,
               "temperature": TEMPERATURE, "beta": c["beta"], "epsilon": EPSILON,
               "num_iterations": c["num_iterations"], "loss_type": c["loss_type"], "scale_rewards": "group",
               "kl_ratio_correction": c["kl_ratio_correction"],
               "rewards": [{"function": "length", "target": TARGET}], "log_completions": 0},
    }


# ---- --child prepare: the starting adapter and the completions -----------------------------------------------------
def prepare(work: Path, generations: int) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.data.prompts import prepare_prompts
    from tuneforge.eval.rollout import SamplingSettings, sample, sample_key, stop_token_ids
    from tuneforge.models.load import load_tokenizer, resolve_precision

    torch.manual_seed(SEED)
    adapter = work / "init_adapter"
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], bias="none",
                                             task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    model.save_pretrained(adapter)

    # the starting model exactly as both sides will load it: the base + the saved adapter
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, adapter).eval()
    cfg = load_config(recipe(work, {"loss_type": "grpo", "beta": 0.0, "num_iterations": 1,
                                    "kl_ratio_correction": True}, adapter))
    tokenizer = load_tokenizer(cfg.model)
    prompts = prepare_prompts(cfg.data, cfg.rl, tokenizer)[0].examples
    eos = stop_token_ids(tokenizer, policy)  # what tuneforge's sampler stops at (and leaves out of the text)
    period = tokenizer.convert_tokens_to_ids(".")
    stops = eos | {period}  # a completion ends at its first sentence: lengths 1..16 tokens, not all 16
    precision = resolve_precision("float32", "cpu")
    settings = SamplingSettings(MAX_COMPLETION, TEMPERATURE)

    def decode(**kwargs):
        return policy(**kwargs)

    out = {"adapter": str(adapter), "stop_ids": sorted(stops), "eos_ids": sorted(eos), "pad_id": tokenizer.pad_token_id,
           "prompts": [{"index": p.index, "text": p.shown, "ids": p.ids} for p in prompts], "generations": []}
    for g in range(generations):
        chosen = [prompts[(g * PROMPTS_PER_STEP + k) % len(prompts)] for k in range(PROMPTS_PER_STEP)]
        rows = [(p, j) for p in chosen for j in range(GENERATIONS_PER_PROMPT)]
        got = sample(decode, [p.ids for p, _ in rows], [sample_key(SEED, g, p.index, j) for p, j in rows],
                     settings, tokenizer.pad_token_id, stops, "cpu", precision)
        out["generations"].append({
            "prompt_indices": [p.index for p in chosen], "prompt_ids": [p.ids for p in chosen],
            "completions": got.completions, "logps": got.logps, "truncated": got.truncated,
            "texts": [tokenizer.decode([t for t in c if t not in eos], skip_special_tokens=True)
                      for c in got.completions]})
    (work / "completions.json").write_text(json.dumps(out))


# ---- --child tuneforge: every configuration, in this one process ---------------------------------------------------
def tuneforge_side(work: Path, configs: list[dict], out_path: Path) -> None:
    import torch

    from tuneforge.config import load_config
    from tuneforge.train import grpo
    from tuneforge.train.recipe import finetune

    fixed = json.loads((work / "completions.json").read_text())
    gens = fixed["generations"]
    trace: dict = {}
    original_generate = grpo.GRPOObjective.generate

    def fixed_sample(self, module, prompts, numbers, settings, precision, env, step, batch_size):
        if settings.greedy:
            raise RuntimeError("validation sampling is not part of this benchmark")
        g = step // self.rl.num_iterations
        want = gens[g]
        indices, ids = [p.index for p in prompts], [p.ids for p in prompts]
        if indices != want["prompt_indices"] or ids != want["prompt_ids"] or numbers != GENERATIONS_PER_PROMPT:
            raise RuntimeError(f"step {step}: tuneforge asks for prompts {indices} (x{numbers}); generation {g} "
                               f"holds {want['prompt_indices']}")
        trace["order"].append({"step": step, "generation": g, "prompts": indices})
        rows = [(p, j) for p in prompts for j in range(numbers)]
        return rows, [list(c) for c in want["completions"]], [list(x) for x in want["logps"]], \
            list(want["truncated"])

    def traced_generate(self, module, prompts, precision, env, step):
        rollout = original_generate(self, module, prompts, precision, env, step)
        trace["advantages"].append(rollout.advantages.tolist())
        trace["texts"].append(list(rollout.texts))
        return rollout

    grpo.GRPOObjective._sample = fixed_sample
    grpo.GRPOObjective.generate = traced_generate
    adapter = Path(fixed["adapter"])
    result = {"side": "tuneforge", "torch_threads": torch.get_num_threads(), "configs": {}}
    for c in configs:
        name = config_name(c)
        trace.clear()
        trace.update(order=[], advantages=[], texts=[])
        started = time.perf_counter()
        cfg = load_config(recipe(work, c, adapter))
        if cfg.rl.kl_ratio_correction is not c["kl_ratio_correction"]:
            raise RuntimeError(f"{name}: rl.kl_ratio_correction is {cfg.rl.kl_ratio_correction}, asked "
                               f"{c['kl_ratio_correction']}")
        run_dir = finetune(cfg, overwrite=True)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [{"step": r["step"], **{k: r[k] for k in ("loss", "grad_norm", "reward", "kl", "entropy",
                                                         "clip_ratio/region_mean", "completion_tokens")
                                        if k in r}} for r in rows if "loss" in r]
        result["configs"][name] = {"config": c, "steps": steps, "order": trace["order"],
                                   "advantages": trace["advantages"], "texts": trace["texts"], "wall_s": wall}
        print(f"[tuneforge] {name}: " + ", ".join(f"{s['loss']:+.6f}/{s['grad_norm']:.6f}" for s in steps),
              flush=True)
    out_path.write_text(json.dumps(result, indent=1))


# ---- the two sides -------------------------------------------------------------------------------------------------
def run_side(cmd: list[str], log_path: Path, env: dict) -> float:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        status = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"failed (status {status}): {' '.join(cmd)}\n{log_path.read_text()[-5000:]}")
    return time.perf_counter() - started


def compare(tf: dict, trl: dict) -> dict:
    a, b = tf["steps"], trl["steps"]
    if [r["step"] for r in a] != [r["step"] for r in b] or len(a) != STEPS:
        raise SystemExit(f"step lists differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    out = {}
    for k in ("loss", "grad_norm", "reward"):
        pairs = [(x[k], y[k]) for x, y in zip(a, b) if k in x and y.get(k) is not None]
        diffs = [abs(x - y) for x, y in pairs]
        out[k] = {"max_abs": max(diffs) if diffs else None, "steps_compared": len(diffs)}
    adv = [abs(x - y) for ga, gb in zip(tf["advantages"], trl["advantages"]) for x, y in zip(ga, gb)]
    out["advantages"] = {"max_abs": max(adv) if adv else None,
                         "generations": [len(tf["advantages"]), len(trl["advantages"])]}
    out["order_equal"] = [(o["step"], o["prompts"]) for o in tf["order"]] == \
        [(o["step"], o["prompts"]) for o in trl["order"]]
    out["texts_equal"] = tf["texts"] == trl["texts"]
    out["ok"] = (out["loss"]["max_abs"] <= TOL and out["grad_norm"]["max_abs"] <= TOL and out["order_equal"])
    out["per_step"] = [{"step": x["step"], **{k: [x.get(k), y.get(k)] for k in ("loss", "grad_norm", "reward")}}
                       for x, y in zip(a, b)]
    return out


def trl_versions(python: str, trl_path: str | None) -> dict:
    code = ("import json, peft, torch, transformers, trl; print(json.dumps({'trl': trl.__version__, 'torch': "
            "torch.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=child_env(trl_path))
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot import trl (pip install --no-deps trl==1.16.0):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict) -> str:
    m = results["machine"]
    t = m["trl"]
    out = [f"Machine: {m['cpus']} CPUs, {m['cpu']}; OMP_NUM_THREADS {m['OMP_NUM_THREADS'] or 'unset'}; Python "
           f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; TRL side: trl "
           f"{t['trl']}, torch {t['torch']}, transformers {t['transformers']}, peft {t['peft']}. Wall: prepare "
           f"{results['wall_s']['prepare']:.0f} s, tuneforge side {results['wall_s']['tuneforge']:.0f} s, TRL side "
           f"{results['wall_s']['trl']:.0f} s, total {results['wall_s']['total']:.0f} s.", "",
           f"### GRPO parity: tuneforge vs TRL GRPOTrainer (stories260K + LoRA r8 from one adapter, fp32, {STEPS} "
           f"steps of {PROMPTS_PER_STEP} prompts x {GENERATIONS_PER_PROMPT} completions, micro {MICRO} x "
           f"accumulation {ACCUM}, fixed completions)", "",
           f"Completions: {results['completions']['count']} fixed ({results['completions']['generations']} "
           f"generations of 16), {results['completions']['min_length']}-{results['completions']['max_length']} "
           f"tokens (mean {results['completions']['mean_length']:.1f}), {results['completions']['truncated']} cut at "
           f"{MAX_COMPLETION}.", "",
           "| loss_type | beta | num_iterations | KL ratio correction (both sides) | max abs diff loss | "
           "max abs diff grad_norm | max abs diff reward | max abs diff advantages | prompt order equal | "
           "texts equal | loss step 1 -> 5 (tuneforge / TRL) | pass (<= 1e-4) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None else f"{x:.1e}"
    for e in results["parity"].values():
        c, p = e["config"], e["compare"]
        tl, rl_ = e["tuneforge"]["steps"], e["trl"]["steps"]
        out.append(f"| {c['loss_type']} | {c['beta']:g} | {c['num_iterations']} | "
                   f"{'true' if c['kl_ratio_correction'] else 'false'} | {f(p['loss']['max_abs'])} | "
                   f"{f(p['grad_norm']['max_abs'])} | {f(p['reward']['max_abs'])} | "
                   f"{f(p['advantages']['max_abs'])} | {'yes' if p['order_equal'] else 'NO'} | "
                   f"{'yes' if p['texts_equal'] else 'NO'} | {tl[0]['loss']:+.6f} -> {tl[-1]['loss']:+.6f} / "
                   f"{rl_[0]['loss']:+.6f} -> {rl_[-1]['loss']:+.6f} | {'yes' if p['ok'] else 'NO'} |")
    required = list(results["parity"].values())
    passed = sum(e["compare"]["ok"] for e in required)
    out += ["", f"{passed} of {len(required)} configurations pass (loss and pre-clip grad_norm within {TOL:g} at "
            f"every step, prompt order identical). KL ratio correction: tuneforge rl.kl_ratio_correction = TRL "
            f"use_bias_correction_kl, the same value on both sides (true = both defaults)."]
    order = results.get("prompt_order_sample")
    if order:
        out.append(f"Prompt order (num_iterations 1, generation -> prompt indices, both sides): {order}.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/tuneforge-bench-grpo")
    ap.add_argument("--out", default=None, help="results json (default WORK/results.json)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS))
    ap.add_argument("--iterations", default=",".join(str(i) for i in ITERATIONS))
    ap.add_argument("--trl-python", default=sys.executable, help="the TRL side's interpreter (default: this one)")
    ap.add_argument("--trl-path", default=None, help="a directory prepended to the TRL side's PYTHONPATH (an "
                                                      "unpacked trl, e.g. /tmp/trlpkgs)")
    ap.add_argument("--kl-without-correction", action="store_true",
                    help="also run beta 0.04 (each of --losses x --iterations) with the KL ratio correction off on "
                         "both sides (tuneforge rl.kl_ratio_correction=false, TRL use_bias_correction_kl=False); "
                         "required to pass too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--configs", help=argparse.SUPPRESS)
    ap.add_argument("--side-out", help=argparse.SUPPRESS)
    ap.add_argument("--generations", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child == "prepare":
        return prepare(work, args.generations)
    if args.child == "tuneforge":
        return tuneforge_side(work, json.loads(Path(args.configs).read_text()), Path(args.side_out))

    started = time.perf_counter()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # the main matrix with both sides' defaults (KL ratio correction on); --kl-without-correction adds beta 0.04 off
    configs = [{"loss_type": lt, "beta": float(b), "num_iterations": int(i), "kl_ratio_correction": True}
               for lt in args.losses.split(",") for b in args.betas.split(",") for i in args.iterations.split(",")]
    if args.kl_without_correction:
        configs += [{"loss_type": lt, "beta": 0.04, "num_iterations": int(i), "kl_ratio_correction": False}
                    for lt in args.losses.split(",") for i in args.iterations.split(",")]
    (work / "configs.json").write_text(json.dumps(configs))

    import peft
    import torch
    import transformers
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    results: dict = {"command": " ".join(sys.argv), "machine": {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?"),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "trl": trl_versions(args.trl_python, args.trl_path), "trl_python": args.trl_python,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "settings": {"steps": STEPS, "prompts_per_step": PROMPTS_PER_STEP, "num_generations": GENERATIONS_PER_PROMPT,
                     "micro": MICRO, "accumulation": ACCUM, "lr": LR, "max_completion_length": MAX_COMPLETION,
                     "temperature": TEMPERATURE, "epsilon": EPSILON, "seed": SEED, "lora": LORA,
                     "lora_b_std": LORA_B_STD, "reward": f"length, target {TARGET}", "tolerance": TOL},
        "wall_s": {}}

    print("[prepare] adapter and completions ...", flush=True)
    results["wall_s"]["prepare"] = run_side(
        [sys.executable, __file__, "--child", "prepare", "--work", str(work), "--generations",
         str(generations_needed(configs))], work / "logs" / "prepare.log", child_env())
    fixed = json.loads((work / "completions.json").read_text())
    lengths = [len(c) for g in fixed["generations"] for c in g["completions"]]
    if len(set(lengths)) < 2:
        raise SystemExit("every completion has the same length: the loss types would normalise alike")
    results["completions"] = {"file": str(work / "completions.json"), "generations": len(fixed["generations"]),
                              "lengths": [[len(c) for c in g["completions"]] for g in fixed["generations"]],
                              "min_length": min(lengths), "mean_length": sum(lengths) / len(lengths),
                              "max_length": max(lengths), "count": len(lengths),
                              "truncated": sum(sum(g["truncated"]) for g in fixed["generations"])}

    tf_out, trl_out = work / "tuneforge.json", work / "trl.json"
    print(f"[tuneforge] {len(configs)} configurations ...", flush=True)
    results["wall_s"]["tuneforge"] = run_side(
        [sys.executable, __file__, "--child", "tuneforge", "--work", str(work), "--configs",
         str(work / "configs.json"), "--side-out", str(tf_out)], work / "logs" / "tuneforge.log", child_env())
    print(f"[trl] {len(configs)} configurations ...", flush=True)
    results["wall_s"]["trl"] = run_side(
        [args.trl_python, str(HERE / "grpo_trl_side.py"), "--completions", str(work / "completions.json"),
         "--model", str(STORIES), "--configs", str(work / "configs.json"), "--out", str(trl_out),
         "--settings", json.dumps(results["settings"])], work / "logs" / "trl.log", child_env(args.trl_path))

    tf, trl = json.loads(tf_out.read_text()), json.loads(trl_out.read_text())
    results["trl_config"] = trl.get("config")
    results["parity"] = {}
    for c in configs:
        name = config_name(c)
        ours = tf["configs"][name]
        theirs = trl["configs"][name]
        results["parity"][name] = {"config": c, "compare": compare(ours, theirs),
                                   "tuneforge": ours, "trl": theirs}
        p = results["parity"][name]["compare"]
        print(f"[{name}] max |diff| loss {p['loss']['max_abs']:.2e}, grad_norm {p['grad_norm']['max_abs']:.2e}",
              flush=True)
    sample = next((e for e in results["parity"].values() if e["config"]["num_iterations"] == 1), None)
    if sample:
        results["prompt_order_sample"] = {o["generation"]: o["prompts"] for o in sample["tuneforge"]["order"]}
    results["wall_s"]["total"] = time.perf_counter() - started
    publish(results, report(results), args.out, work, "per-step values of both sides, prompt orders, advantages, logs")


if __name__ == "__main__":
    main()
