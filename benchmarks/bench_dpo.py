"""Preference tuning (DPO), side by side: tuneforge (its real CLI) against TRL's DPOTrainer, same pairs, model,
batches, order and hyper-parameters, alternating in one invocation, each side in its own process.

    pip install --no-deps trl==1.16.0          # the other side; tuneforge itself does not need it
    PYTHONPATH=. python benchmarks/bench_dpo.py [--out RESULTS.json] [--work /tmp/tuneforge-bench-dpo] \\
        [--parts parity-a,parity-b,packing,auto,adapter-off] [--losses sigmoid,ipo,hinge] [--trl-python PYTHON]

or, with TRL kept out of tuneforge's environment, in a virtualenv of its own holding the same torch, transformers
and peft (the TRL side then runs under that interpreter; tuneforge's side and this script under the current one):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.23.0 \\
        peft==0.21.2
    PYTHONPATH=. python benchmarks/bench_dpo.py --parts parity-a --losses sigmoid,bco_pair \\
        --trl-python /tmp/trlvenv/bin/python

What is run (every run fp32 on CPU unless said otherwise; 10 optimizer steps of micro batch 2 x accumulation 2 =
4 pairs a step, the pairs in file order; beta 0.1; AdamW fused, betas (0.9, 0.999), eps 1e-8, weight decay 0,
constant lr, no warmup, grad-norm clip 1.0; loss types sigmoid, ipo and hinge, or those of --losses: any
preference.loss_type that TRL's DPOTrainer has under the same name, e.g. bco_pair)
  parity-a  full fine-tuning of assets/models/stories260K (512 positions), lr 5e-4, seq_length / max_length 256, on
            the first 40 shipped SQuAD pairs (assets/data/squad_pairs/train.jsonl) with the context cut off: prompt
            "Question: ... Answer:", chosen/rejected " <answer>" (leading space). tuneforge's reference is
            precomputed (peft null -> reference auto = precomputed); TRL loads a second copy of the model.
  parity-b  LoRA r8 / alpha 16 / dropout 0 on all linear layers of SmolLM2-135M-Instruct, lr 2e-4, seq_length /
            max_length 512: tuneforge is given models/SmolLM2-135M-Instruct.Q4_1.gguf and dequantizes it to its
            cached transformers directory (tuneforge.models.gguf.gguf_model_dir); TRL is given that directory.
            Both start from ONE adapter made here (peft get_peft_model after torch.manual_seed(0): A random, B = 0):
            tuneforge through model.init_from (reference precomputed = the starting model = the base, B being 0),
            TRL through lora["init_adapter"] (reference = its frozen "ref" copy of that adapter: the same numbers).
            Pairs: the first 40 shipped SQuAD pairs whose whole prompt "Context: ... Question: ... Answer:" is at
            most 150 SmolLM2 tokens, chosen/rejected " <answer>".
  speed     parity-b's sigmoid runs: real tokens/s = median over steps 3..10 of tokens / step_seconds (tokens = the
            non-padding tokens of the step's chosen and rejected sequences, prompt included, counted once although
            the policy and the reference both read them), peak RSS of each side's process (the kernel's wait4
            accounting: model loading and TRL's reference copy included). adapter-off adds a tuneforge run of the
            same recipe from a fresh adapter (no init_from; reference adapter_off: a reference forward every step,
            as TRL does; A initialised from tuneforge's seed, so its losses are not compared).
  packing   tuneforge only, LoRA SmolLM2 sigmoid from the same adapter, 10 steps without accumulation on 60 pairs:
            data.batching pad_longest with micro batch 4 pairs, against packing with micro batch 1 row of
            seq_length tokens (a packed row holds both sequences of its pairs, in rows of max(seq_length, the
            longest pair) tokens), seq_length chosen so that a row holds ~4 pairs on average (the same pairs per
            step, about). Real tokens/s and finite losses; `auto` repeats both with model.dtype auto (bf16 autocast
            where the CPU has bf16 matmuls).

Parity: per step, |tuneforge - TRL| of loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}
and grad_norm (both pre-clip); loss and rewards must be within 1e-4 absolute. Token ids: every pair's (prompt,
chosen, rejected) ids from tuneforge.data.pairs.prepare_pairs (the recipe's data section) against TRL's prepared
dataset (the TRL side dumps it). The script prints a markdown section and writes everything to --out."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.side_by_side import publish

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAIRS_SRC = REPO / "assets" / "data" / "squad_pairs" / "train.jsonl"
STORIES = REPO / "assets" / "models" / "stories260K"
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LOSSES = ("sigmoid", "ipo", "hinge")  # the default of --losses
STEPS, MICRO, ACCUM, BETA, SEED = 10, 2, 2, 0.1, 0
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
CONFIGS = {
    "a": {"title": "full fine-tuning, stories260K", "lr": 5e-4, "seq_length": 256, "lora": False},
    "b": {"title": "LoRA r8 all-linear, SmolLM2-135M-Instruct", "lr": 2e-4, "seq_length": 512, "lora": True},
}
PROMPT_TOKENS_B = 150  # parity-b / packing pairs: whole prompts of at most this many SmolLM2 tokens
PACK_PAIRS, PACK_MICRO_UNPACKED, PACK_PAIRS_PER_ROW = 60, 4, 4
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "grad_norm")
REQUIRED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
TOL = 1e-4


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                TOKENIZERS_PARALLELISM="false")


# ---- the shared inputs -------------------------------------------------------------------------------------------
def read_src() -> list[dict]:
    return [json.loads(line) for line in PAIRS_SRC.read_text().splitlines() if line.strip()]


def write_pairs(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_pairs_a(work: Path) -> Path:
    """Question-only prompts (stories260K tokenizes ~1 token per 2 characters and has 512 positions)."""
    rows = []
    for r in read_src():
        prompt = r["prompt"][r["prompt"].index("Question: "):]
        rows.append({"prompt": prompt, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})
        if len(rows) == STEPS * MICRO * ACCUM:
            break
    path = work / "pairs_a.jsonl"
    write_pairs(path, rows)
    return path


def build_pairs_b(work: Path, model_dir: Path) -> tuple[Path, Path, int, dict]:
    """Whole SQuAD prompts of <= PROMPT_TOKENS_B tokens, file order: the parity file (40 pairs) and the packing file
    (PACK_PAIRS); the packing seq_length (a row of seq_length holds ~PACK_PAIRS_PER_ROW pairs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    src = read_src()
    lengths = [len(ids) for ids in tok([r["prompt"] for r in src])["input_ids"]]
    rows, pair_tokens, prompt_tokens = [], [], []
    for r, n in zip(src, lengths):
        if n <= PROMPT_TOKENS_B:
            row = {"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            rows.append(row)
            prompt_tokens.append(n)
            c, j = (len(tok(row["prompt"] + row[k])["input_ids"]) - n + 1 for k in ("chosen", "rejected"))
            pair_tokens.append(2 * n + c + j)  # what a packed row holds of it (prompt twice, completions + eos)
        if len(rows) == PACK_PAIRS:
            break
    parity, packing = work / "pairs_b.jsonl", work / "pairs_pack.jsonl"
    write_pairs(parity, rows[:STEPS * MICRO * ACCUM])
    write_pairs(packing, rows)
    mean_pair = sum(pair_tokens) / len(pair_tokens)
    seq_length = int(math.ceil(PACK_PAIRS_PER_ROW * mean_pair / 16) * 16)
    stats = {"pairs": len(rows), "mean_pair_tokens": mean_pair, "max_pair_tokens": max(pair_tokens),
             "mean_prompt_tokens": statistics.mean(prompt_tokens),
             "mean_prompt_tokens_parity": statistics.mean(prompt_tokens[:STEPS * MICRO * ACCUM])}
    return parity, packing, seq_length, stats


def smollm_dir() -> Path:
    """The transformers directory tuneforge dequantizes the GGUF file to (made here if it is not cached yet)."""
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.gguf import gguf_model_dir

    return gguf_model_dir(ModelConfig(name_or_path=str(GGUF)))


def make_adapter(model_dir: Path, out: Path) -> None:
    """--child adapter: one LoRA adapter, saved; both sides start from it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], bias="none",
                                             task_type="CAUSAL_LM"))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(float(p.abs().max()) == 0 for p in b), "peft's lora_B init is not zero"
    model.save_pretrained(out)


# ---- one side per process ----------------------------------------------------------------------------------------
def wait_child(cmd: list[str], log_path: Path) -> tuple[int, float, float, float]:
    """(status, peak RSS MiB of that process from wait4, wall seconds, load average at the end)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return status, usage.ru_maxrss / 1024, time.perf_counter() - started, os.getloadavg()[0]


def tf_recipe(work: Path, name: str, model: str, pairs: Path, seq_length: int, lr: float, loss_type: str,
              micro: int, global_batch: int, batching: str = "pad_longest", dtype: str = "float32",
              lora: bool = False, init_from: Path | None = None) -> Path:
    import yaml

    recipe = {
        "run": {"name": name, "output_dir": str(work / "runs"), "seed": SEED},
        "model": {"name_or_path": model, "dtype": dtype,
                  **({"init_from": str(init_from)} if init_from else {})},
        "peft": ({"method": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"],
                  "lora_dropout": LORA["dropout"], "target_modules": LORA["target_modules"]} if lora else None),
        "data": {"train": {"path": str(pairs), "format": "preference"}, "validation": None,
                 "seq_length": seq_length, "batching": batching, "shuffle": False,
                 "cache_dir": str(work / "cache")},
        "train": {"micro_batch_size": micro, "global_batch_size": global_batch, "max_steps": STEPS,
                  "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                "eps": 1e-8, "fused": True},
                  "lr_scheduler": {"name": "constant", "warmup_steps": 0}, "grad_clip": 1.0,
                  "log_every_steps": 1},
        "checkpoint": {"every_steps": None, "resume": "never"},
        "logging": {"tensorboard": False, "progress": False},
        "preference": {"loss_type": loss_type, "beta": BETA},
    }
    path = work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_tuneforge(work: Path, recipe: Path) -> dict:
    name = recipe.stem
    cmd = [sys.executable, "-m", "tuneforge", "finetune", "-c", str(recipe), "--overwrite"]
    log_path = work / "logs" / f"{name}.log"
    status, rss, wall, load = wait_child(cmd, log_path)
    text = log_path.read_text()
    if status != 0:
        raise SystemExit(f"tuneforge failed (status {status}): {' '.join(cmd)}\n{text[-4000:]}")
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    lines = [ln for ln in text.splitlines() if "reference:" in ln or "data:" in ln or "precision:" in ln
             or "batch:" in ln or "init_from" in ln or "trainable" in ln]
    ref = re.search(r"reference: log-probs of the starting model for \d+ pairs in ([0-9.]+)s", text)
    return {"side": "tuneforge", "command": " ".join(cmd), "steps": steps, "peak_rss_mb": rss, "wall_s": wall,
            "load_avg": load, "log_lines": lines, "self_peak_rss_mb": max(r["peak_rss_mb"] for r in steps),
            "reference_s": float(ref.group(1)) if ref else None}


def run_trl(work: Path, name: str, pairs: Path, model_dir: Path, loss_type: str, lr: float, max_length: int,
            lora: dict | None, python: str) -> dict:
    out = work / "trl" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [python, str(HERE / "dpo_trl_side.py"), "--pairs", str(pairs), "--model", str(model_dir),
           "--out", str(out), "--loss-type", loss_type, "--beta", str(BETA), "--steps", str(STEPS),
           "--micro-batch", str(MICRO), "--accumulation", str(ACCUM), "--lr", str(lr), "--max-length",
           str(max_length), "--seed", str(SEED)] + (["--lora", json.dumps(lora)] if lora else [])
    log_path = work / "logs" / f"{name}.log"
    status, rss, wall, load = wait_child(cmd, log_path)
    if status != 0 or not out.exists():
        raise SystemExit(f"TRL failed (status {status}): {' '.join(cmd)}\n{log_path.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    return {"side": "trl", "command": " ".join(cmd), "steps": result["steps"], "peak_rss_mb": rss, "wall_s": wall,
            "load_avg": load, "self_peak_rss_mb": result["peak_rss_mb"], "config": result["config"],
            "token_ids": result["token_ids"]}


# ---- comparisons -------------------------------------------------------------------------------------------------
def speed(run: dict, first: int = 3) -> dict:
    rows = [r for r in run["steps"] if r["step"] >= first]
    return {"tokens_per_s": statistics.median(r["tokens"] / r["step_seconds"] for r in rows),
            "step_s": statistics.median(r["step_seconds"] for r in rows),
            "tokens_per_step": statistics.median(r["tokens"] for r in rows),
            "pairs_per_step": statistics.median(r.get("pairs", MICRO * ACCUM) for r in rows),
            "peak_rss_mb": run["peak_rss_mb"], "wall_s": run["wall_s"], "load_avg": run["load_avg"],
            "reference_s": run.get("reference_s")}


def parity(tf: dict, trl: dict) -> dict:
    a, b = tf["steps"], trl["steps"]
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise SystemExit(f"step lists differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    diffs = {k: [abs(x[k] - y[k]) for x, y in zip(a, b)] for k in COMPARED}
    out = {k: {"max_abs": max(v), "at_step": a[v.index(max(v))]["step"]} for k, v in diffs.items()}
    out["tokens_equal"] = all(x["tokens"] == y["tokens"] for x, y in zip(a, b))
    out["ok"] = all(out[k]["max_abs"] <= TOL for k in REQUIRED)
    out["loss_first_last"] = {"tuneforge": [a[0]["loss"], a[-1]["loss"]], "trl": [b[0]["loss"], b[-1]["loss"]]}
    out["per_step"] = [{"step": x["step"], **{k: [x[k], y[k]] for k in COMPARED}} for x, y in zip(a, b)]
    return out


def tuneforge_ids(recipe: Path) -> list[list[list[int]]]:
    from tuneforge.config import load_config
    from tuneforge.data.pairs import prepare_pairs
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.models.load import load_tokenizer

    cfg = resolve_model_source(load_config(recipe))
    train, _ = prepare_pairs(cfg.data, cfg.preference, load_tokenizer(cfg.model))
    return [[p.prompt, p.chosen, p.rejected] for p in train.examples.pairs]


def token_check(recipe: Path, trl_ids: list, model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    ours = tuneforge_ids(recipe)
    tok = AutoTokenizer.from_pretrained(model_dir)
    differ = [i for i, (x, y) in enumerate(zip(ours, trl_ids)) if x != y]
    show = differ[0] if differ else 0

    def pieces(ids):
        return tok.convert_ids_to_tokens(ids)
    sample = {"pair": show, "tuneforge": ours[show], "trl": trl_ids[show],
              "tuneforge_tokens": [pieces(x[-8:]) if j == 0 else pieces(x) for j, x in enumerate(ours[show])],
              "trl_tokens": [pieces(x[-8:]) if j == 0 else pieces(x) for j, x in enumerate(trl_ids[show])]}
    return {"pairs": len(ours), "trl_pairs": len(trl_ids), "equal": not differ and len(ours) == len(trl_ids),
            "differing_pairs": differ, "sample": sample}


# ---- the whole benchmark -----------------------------------------------------------------------------------------
def trl_versions(python: str) -> dict:
    """The versions the TRL side runs with (its interpreter may be another virtualenv's)."""
    code = ("import json, peft, torch, transformers, trl; print(json.dumps({'trl': trl.__version__, 'torch': "
            "torch.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=child_env())
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot import trl (pip install trl==1.16.0 there):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(trl_python: str) -> dict:
    import peft
    import torch
    import transformers

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("Flags")), [])
    return {"cpu": model, "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "amx_tile": "amx_tile" in flags, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl_versions(trl_python), "trl_python": trl_python, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_avg_start": os.getloadavg()}


def parity_config(key: str, work: Path, results: dict, model_dir: Path, pairs: Path, adapter: Path | None,
                  losses: tuple[str, ...], trl_python: str) -> None:
    c = CONFIGS[key]
    model = str(GGUF) if c["lora"] else str(STORIES)
    trl_lora = {**LORA, "init_adapter": str(adapter)} if c["lora"] else None
    part = results.setdefault(f"parity-{key}", {"title": c["title"], "lr": c["lr"], "seq_length": c["seq_length"],
                                                "pairs": str(pairs), "model_tuneforge": model,
                                                "model_trl": str(model_dir), "losses": {}})
    for n, loss in enumerate(losses):
        recipe = tf_recipe(work, f"{key}-{loss}", model, pairs, c["seq_length"], c["lr"], loss, MICRO,
                           MICRO * ACCUM, lora=c["lora"], init_from=adapter)
        order = ("tuneforge", "trl") if n % 2 == 0 else ("trl", "tuneforge")  # alternate who runs first
        runs = {}
        for side in order:
            print(f"[{key}/{loss}] {side} ...", flush=True)
            runs[side] = (run_tuneforge(work, recipe) if side == "tuneforge" else
                          run_trl(work, f"{key}-{loss}-trl", pairs, model_dir, loss, c["lr"], c["seq_length"],
                                  trl_lora, trl_python))
        entry = {"order": list(order), "parity": parity(runs["tuneforge"], runs["trl"]),
                 "speed": {s: speed(r) for s, r in runs.items()},
                 "runs": {s: {k: v for k, v in r.items() if k != "token_ids"} for s, r in runs.items()}}
        if n == 0:
            part["tokens"] = token_check(recipe, runs["trl"]["token_ids"], model_dir)
        part["losses"][loss] = entry
        p = entry["parity"]
        print(f"[{key}/{loss}] max |diff|: " + ", ".join(f"{k} {p[k]['max_abs']:.2e}" for k in COMPARED), flush=True)


def tuneforge_only(work: Path, results: dict, name: str, recipe: Path) -> None:
    print(f"[{name}] tuneforge ...", flush=True)
    run = run_tuneforge(work, recipe)
    results.setdefault("tuneforge_only", {})[name] = {
        "speed": speed(run), "run": run, "losses": [r["loss"] for r in run["steps"]],
        "finite": all(math.isfinite(r["loss"]) for r in run["steps"])}


def report(results: dict) -> str:
    m = results["machine"]
    t = m["trl"]
    out = [f"Machine: {m['cpus']} CPUs, {m['cpu']} (avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, amx "
           f"{'yes' if m['amx_bf16'] or m['amx_tile'] else 'no'}), torch threads {m['torch_threads']}, "
           f"OMP_NUM_THREADS {m['OMP_NUM_THREADS'] or 'unset'}; load average {m['load_avg_start'][0]:.2f} at the "
           f"start, {results['load_avg_end'][0]:.2f} at the end. Python {m['python']}, torch {m['torch']}, "
           f"transformers {m['transformers']}, peft {m['peft']}; TRL side ({m['trl_python']}): trl {t['trl']}, "
           f"torch {t['torch']}, transformers {t['transformers']}, peft {t['peft']}. Total {results['wall_s']:.0f} s.",
           ""]
    for key in ("a", "b"):
        part = results.get(f"parity-{key}")
        if not part:
            continue
        out += [f"### Parity {key}: {part['title']} (lr {part['lr']}, seq_length {part['seq_length']}, "
                f"{STEPS} steps of {MICRO} x {ACCUM} pairs)", ""]
        t = part.get("tokens")
        if t:
            s = t["sample"]
            out.append(f"Token ids: {t['pairs']} pairs, tuneforge and TRL {'identical' if t['equal'] else 'DIFFER'}"
                       + (f" (differing pairs: {t['differing_pairs'][:10]})" if not t["equal"] else "") +
                       f". Pair {s['pair']}: prompt ({len(s['tuneforge'][0])} / {len(s['trl'][0])} tokens) ends "
                       f"`{s['tuneforge'][0][-6:]}` / `{s['trl'][0][-6:]}`; chosen `{s['tuneforge'][1]}` / "
                       f"`{s['trl'][1]}`; rejected `{s['tuneforge'][2]}` / `{s['trl'][2]}` (tuneforge / TRL).")
            out.append("")
        out.append("| loss type | " + " | ".join(f"max abs diff {k}" for k in COMPARED) +
                   " | tokens equal | loss step 1 -> 10 (tuneforge / TRL) | pass (<= 1e-4) |")
        out.append("|---|" + "---|" * (len(COMPARED) + 3))
        for loss, e in part["losses"].items():
            p = e["parity"]
            fl = p["loss_first_last"]
            out.append(f"| {loss} | " + " | ".join(f"{p[k]['max_abs']:.1e}" for k in COMPARED) +
                       f" | {'yes' if p['tokens_equal'] else 'NO'} | {fl['tuneforge'][0]:.6f} -> "
                       f"{fl['tuneforge'][1]:.6f} / {fl['trl'][0]:.6f} -> {fl['trl'][1]:.6f} | "
                       f"{'yes' if p['ok'] else 'NO'} |")
        out.append("")
        out.append("| loss type | side (in run order) | real tokens/s (median steps 3-10) | step s | tokens/step | "
                   "peak RSS MiB | reference pass s | process wall s | load average after |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for loss, e in part["losses"].items():
            for side in e["order"]:
                s = e["speed"][side]
                ref = f"{s['reference_s']:.1f}" if s.get("reference_s") is not None else "-"
                out.append(f"| {loss} | {side} | {s['tokens_per_s']:,.0f} | {s['step_s']:.2f} | "
                           f"{s['tokens_per_step']:,.0f} | {s['peak_rss_mb']:,.0f} | {ref} | {s['wall_s']:.0f} | "
                           f"{s['load_avg']:.2f} |")
        out.append("")
    b = results.get("parity-b", {}).get("losses", {}).get("sigmoid")
    if b:
        tf, trl = b["speed"]["tuneforge"], b["speed"]["trl"]
        out += ["### Speed and memory (parity-b, sigmoid)", "",
                "| side | real tokens/s | step s | peak RSS MiB | tokens/s vs TRL | peak RSS vs TRL |",
                "|---|---|---|---|---|---|",
                f"| tuneforge (init_from adapter, reference precomputed) | {tf['tokens_per_s']:,.0f} | "
                f"{tf['step_s']:.2f} | {tf['peak_rss_mb']:,.0f} | {tf['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
                f"{tf['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x |"]
        off = results.get("tuneforge_only", {}).get("adapter-off")
        if off:
            s = off["speed"]
            out.append(f"| tuneforge (fresh adapter, reference adapter_off: a reference forward each step) | "
                       f"{s['tokens_per_s']:,.0f} | {s['step_s']:.2f} | {s['peak_rss_mb']:,.0f} | "
                       f"{s['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
                       f"{s['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x |")
        out.append(f"| TRL DPOTrainer (init_adapter, reference = its 'ref' adapter copy) | "
                   f"{trl['tokens_per_s']:,.0f} | {trl['step_s']:.2f} | {trl['peak_rss_mb']:,.0f} | 1.00x | 1.00x |")
        ratios = [f"{loss} {e['speed']['tuneforge']['tokens_per_s'] / e['speed']['trl']['tokens_per_s']:.2f}x "
                  f"tokens/s, {e['speed']['tuneforge']['peak_rss_mb'] / e['speed']['trl']['peak_rss_mb']:.2f}x "
                  "peak RSS" for loss, e in results["parity-b"]["losses"].items()]
        out += ["", f"tuneforge's reference pass (before step 1, not in step_seconds): {tf['reference_s']} s. "
                f"tuneforge / TRL in each parity-b run: {'; '.join(ratios)}.", ""]
    only = results.get("tuneforge_only", {})
    pack = [(k, v) for k, v in only.items() if k.startswith("pack-")]
    if pack:
        out += [f"### Packing (tuneforge, LoRA SmolLM2, sigmoid, {STEPS} steps, no accumulation; seq_length "
                f"{results['packing_seq_length']})", "",
                "| dtype | batching | micro batch | pairs/step (median) | real tokens/step | real tokens/s | step s | "
                "peak RSS MiB | losses finite | loss step 1 -> 10 | step 1: loss - ln 2, rewards/accuracies |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in pack:
            s, dtype, batching = v["speed"], k.split("-")[2], k.split("-")[1]
            micro = "1 row of seq_length" if batching == "packing" else f"{PACK_MICRO_UNPACKED} pairs"
            first = v["run"]["steps"][0]
            out.append(f"| {dtype} | {batching} | {micro} | {s['pairs_per_step']:.0f} | {s['tokens_per_step']:,.0f} | "
                       f"{s['tokens_per_s']:,.0f} | {s['step_s']:.2f} | {s['peak_rss_mb']:,.0f} | "
                       f"{'yes' if v['finite'] else 'NO'} | {v['losses'][0]:.4f} -> {v['losses'][-1]:.4f} | "
                       f"{first['loss'] - math.log(2):+.1e}, {first['rewards/accuracies']:.2f} |")
        lay = results.get("packing_layout")
        if lay:
            out.append(f"\nLayout over the 10 steps: pad_longest computes {lay['unpacked_computed']:,} token positions "
                       f"for {lay['unpacked_real']:,} real ({100 * lay['unpacked_padding']:.1f}% padding), attention "
                       f"score entries (sum over rows of width^2) {lay['unpacked_scores']:,}; packing fills its rows "
                       f"{100 * lay['packed_fill']:.1f}% (of {results['packing_seq_length']} tokens) and sdpa "
                       "attends "
                       f"over each whole row under a block-diagonal mask: {lay['packed_scores']:,} score entries "
                       f"({lay['packed_scores'] / lay['unpacked_scores']:.1f}x).")
        for dtype in ("float32", "auto"):
            a, p = only.get(f"pack-pad_longest-{dtype}"), only.get(f"pack-packing-{dtype}")
            if a and p:
                out.append(f"\n{dtype}: packing / pad_longest = "
                           f"{p['speed']['tokens_per_s'] / a['speed']['tokens_per_s']:.2f}x real tokens/s")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/tuneforge-bench-dpo")
    ap.add_argument("--out", default=None, help="results json (default WORK/results.json)")
    ap.add_argument("--parts", default="parity-a,parity-b,adapter-off,packing,auto")
    ap.add_argument("--losses", default=",".join(LOSSES), help="loss types of the parity runs (TRL's names)")
    ap.add_argument("--trl-python", default=sys.executable,
                    help="the interpreter of the TRL side, e.g. a virtualenv with trl (default: this one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "adapter":
        return make_adapter(Path(args.model_dir), Path(args.adapter))
    started = time.perf_counter()
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    parts, losses = set(args.parts.split(",")), tuple(args.losses.split(","))
    results: dict = {"machine": machine(args.trl_python), "command": " ".join(sys.argv), "settings": {
        "steps": STEPS, "micro": MICRO, "accumulation": ACCUM, "beta": BETA, "seed": SEED, "lora": LORA,
        "configs": CONFIGS, "tolerance": TOL, "losses": losses}}
    adapter = work / "init_adapter"
    if parts & {"parity-b", "adapter-off", "packing", "auto"}:  # SmolLM2: dequantized once, then cached
        smol = smollm_dir()
        results["smollm_dir"] = str(smol)
        pairs_b, pairs_pack, pack_seq, stats = build_pairs_b(work, smol)
        results["pairs_b_stats"], results["packing_seq_length"] = stats, pack_seq
    if parts & {"parity-b", "packing", "auto"}:
        status = subprocess.run([sys.executable, __file__, "--child", "adapter", "--model-dir", str(smol),
                                 "--adapter", str(adapter)], cwd=REPO, env=child_env()).returncode
        if status != 0:
            raise SystemExit("making the init adapter failed")
    if "parity-a" in parts:
        parity_config("a", work, results, STORIES, build_pairs_a(work), None, losses, args.trl_python)
    if "parity-b" in parts:
        parity_config("b", work, results, smol, pairs_b, adapter, losses, args.trl_python)
    if "adapter-off" in parts:
        tuneforge_only(work, results, "adapter-off", tf_recipe(
            work, "b-sigmoid-adapter-off", str(GGUF), pairs_b, CONFIGS["b"]["seq_length"], CONFIGS["b"]["lr"],
            "sigmoid", MICRO, MICRO * ACCUM, lora=True))
    for dtype in ("float32", "auto"):
        if ("packing" if dtype == "float32" else "auto") not in parts:
            continue
        for batching, micro in (("pad_longest", PACK_MICRO_UNPACKED), ("packing", 1)):
            name = f"pack-{batching}-{dtype}"
            tuneforge_only(work, results, name, tf_recipe(
                work, name, str(GGUF), pairs_pack, pack_seq, CONFIGS["b"]["lr"], "sigmoid", micro, micro,
                batching=batching, dtype=dtype, lora=True, init_from=adapter))
    only = results.get("tuneforge_only", {})
    if "pack-pad_longest-float32" in only and "pack-packing-float32" in only:
        ids = tuneforge_ids(work / "recipes" / "pack-pad_longest-float32.yaml")
        real = computed = scores = 0
        for k in range(0, STEPS * PACK_MICRO_UNPACKED, PACK_MICRO_UNPACKED):
            group = ids[k:k + PACK_MICRO_UNPACKED]
            widths = [len(p) + len(c) for p, c, _ in group] + [len(p) + len(r) for p, _, r in group]
            real, computed = real + sum(widths), computed + len(widths) * max(widths)
            scores += len(widths) * max(widths) ** 2
        packed = only["pack-packing-float32"]["run"]["steps"]
        row = 2 * pack_seq
        results["packing_layout"] = {
            "unpacked_real": real, "unpacked_computed": computed, "unpacked_padding": 1 - real / computed,
            "unpacked_scores": scores, "packed_fill": sum(r["tokens"] for r in packed) / (row * len(packed)),
            "packed_scores": sum(r["tokens"] ** 2 for r in packed)}  # micro 1: a step is one row, no padding
    results["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    publish(results, report(results), args.out, work, "per-step values of both sides, logs, commands")


if __name__ == "__main__":
    main()
