"""Online RL (GRPO) speed and memory, side by side on the same CPU: tuneforge (its real CLI, on
recipes/smollm2_squad_grpo.yaml) against TRL 1.16's GRPOTrainer (transformers' generate, no vLLM), on the same model,
LoRA, prompts (the same ones per step, in the same order), group size, completion length and sampling settings; each
side in its own process, both in one invocation.

    pip install --no-deps trl==1.16.0          # the other side; tuneforge itself does not need it
    PYTHONPATH=. python benchmarks/bench_grpo_speed.py [--steps 6] [--repeat 1] [--out RESULTS.json] \\
        [--work /tmp/tuneforge-bench-grpo-speed] [--dtype auto|float32] [--trl-python PYTHON] [--trl-path DIR]

    e.g. with TRL unpacked at /tmp/trlpkgs, on a quiet machine:
    PYTHONPATH=. python benchmarks/bench_grpo_speed.py --trl-path /tmp/trlpkgs --steps 6 --repeat 2 \\
        --out /tmp/grpo_speed.json

(--trl-python: the TRL side's interpreter, e.g. a virtualenv holding trl 1.16.0 with the same torch, transformers and
peft, as in benchmarks/bench_dpo.py; default this one. --trl-path prepends a directory holding an unpacked trl to the
TRL process's PYTHONPATH only. Threads: each side uses torch's default (all cores) unless OMP_NUM_THREADS is set for
this command, which both sides inherit; the report gives each side's torch thread count.)

What is run (--steps N optimizer steps per side, default 6)
  model      tuneforge: models/SmolLM2-135M-Instruct.Q4_1.gguf, which it dequantizes once to its cached
             transformers directory (tuneforge.models.gguf.gguf_model_dir); TRL: that directory, loaded in fp32.
             LoRA r 16 / alpha 32 / dropout 0 on all linear layers (peft's "all-linear"), a fresh adapter each side.
  precision  bf16 autocast on both sides where this CPU has bf16 matmuls (tuneforge's model.dtype auto decides:
             AVX512-BF16 / AMX; TRL then gets GRPOConfig(bf16=True) on fp32 weights), else fp32 on both; --dtype
             float32 forces fp32 on both (tuneforge model.dtype=float32, TRL bf16=False).
  prompts    the recipe's data section (the shipped SQuAD train questions through SmolLM2's chat template with the
             recipe's system prompt, the context cut to data.seq_length - rl.max_completion_length tokens), as
             tuneforge.data.prompts.prepare_prompts makes them, in file order (tuneforge data.shuffle=false). TRL
             gets the first N x 4 of them as text (tokenizer.decode of tuneforge's ids: already chat-templated, a plain
             string, so TRL does not template it again) with their `answers`, shuffle_dataset=False: step s takes
             prompts 4(s-1) .. 4s-1 on both sides. Checked: TRL's tokenization of every text (its own call,
             processing_class(text=...)) gives tuneforge's ids, no BOS added; the prompt indices each side generated
             for at every step are the same lists.
  a step     4 prompts x 8 completions (G 8) of at most 24 tokens, temperature 0.7, top_p 1, top_k 0, sampled by the
             policy being trained; reward: SQuAD F1 of the completion's first line against the gold answers
             (tuneforge's built-in squad_f1; TRL gets tuneforge.eval.rewards.squad_f1_reward, the same function);
             advantages scaled by the group's std (scale_rewards group); loss dapo, beta 0 (no reference model);
             micro-batches of 16 completions, 2 per step (tuneforge micro_batch_size 16 / global 32; TRL
             per_device_train_batch_size 16, gradient_accumulation_steps 2 = one generation per step); AdamW lr 5e-4
             constant (tuneforge's recipe has a cosine schedule after 5 warmup steps: constant without warmup here,
             as TRL's), weight decay 0,
             grad-norm clip 1.0, seed 42; no activation checkpointing on either side.
  tuneforge  `python -m tuneforge finetune -c recipes/smollm2_squad_grpo.yaml --overwrite` with overrides
             train.max_steps=N eval.squad=null checkpoint.every_steps=null logging.tensorboard=false
             data.shuffle=false train.lr_scheduler.name=constant train.lr_scheduler.warmup_steps=0
             rl.log_completions=0 logging.progress=false, its run in --work (the CLI runs in-process in a small
             wrapper that records the prompt indices of each generation; nothing else is touched). Everything else
             is the recipe and tuneforge's defaults.
  TRL        benchmarks/grpo_speed_trl_side.py: GRPOTrainer set up as a careful user would for this CPU (its
             docstring).

What is measured, per side
  step s        tuneforge: metrics.jsonl step_seconds (the loop's wall time of the step); TRL: a TrainerCallback,
                on_step_begin .. on_step_end.
  generation s  sampling only: tuneforge generation_seconds (GRPOObjective._sample); TRL: the time in
                GRPOTrainer._generate_single_turn (its generate call).
  training s    forward + backward of the step's micro-batches: tuneforge training_seconds (accumulate_policy); TRL:
                the time in training_step less the _prepare_inputs (generation, rewards) inside it.
  other s       step - generation - training: rewards, advantages, tokenizing / decoding, clipping, the optimizer.
  Each: the median over steps 2..N (step 1 warms up); with --repeat 2 the median of the runs' medians.
  peak RSS      the kernel's peak resident set of each side's whole process (os.wait4 of the child: interpreter,
                imports, model loading, training), MiB.
  workload      the mean completion length (tokens, eos included) and mean reward of each step on both sides. They
                sample with different random streams, so these differ; they show the two sides did comparable work.
--repeat R runs R rounds, alternating which side goes first (round 1 tuneforge then TRL, round 2 TRL then tuneforge,
...). The script prints a markdown section (command, machine, versions, tables) and writes everything (per-step
values of every run, logs, commands) to --out (default WORK/results.json)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.side_by_side import publish

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "smollm2_squad_grpo.yaml"
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# what both sides run; checked against the recipe (with the overrides below) before anything runs
SETTINGS = {"prompts_per_step": 4, "num_generations": 8, "micro": 16, "accumulation": 2, "max_completion_length": 24,
            "temperature": 0.7, "top_p": 1.0, "top_k": 0, "beta": 0.0, "loss_type": "dapo", "scale_rewards": "group",
            "lr": 5e-4, "grad_clip": 1.0, "seed": 42, "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                             "target_modules": "all-linear"}}
FIRST = 2  # medians over steps FIRST..N: step 1 warms up


def child_env(extra_path: str | None = None) -> dict:
    path = os.pathsep.join(x for x in (extra_path, str(REPO), os.environ.get("PYTHONPATH")) if x)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                TOKENIZERS_PARALLELISM="false")


def tf_overrides(work: Path, name: str, steps: int, dtype: str) -> list[str]:
    return [f"run.name={name}", f"run.output_dir={work / 'runs'}", f"train.max_steps={steps}", "eval.squad=null",
            "checkpoint.every_steps=null", "checkpoint.resume=never", "logging.tensorboard=false",
            "logging.progress=false", "data.shuffle=false", "train.lr_scheduler.warmup_steps=0",
            "train.lr_scheduler.name=constant", "rl.log_completions=0"] + \
        (["model.dtype=float32"] if dtype == "float32" else [])


# ---- the shared inputs ---------------------------------------------------------------------------------------------
def prepare(work: Path, steps: int, dtype: str) -> dict:
    """tuneforge's prepared prompts (the recipe's data section, file order): ids, the text TRL gets, the answers.
    Also checks that the recipe (with the overrides) is what SETTINGS says both sides run."""
    from tuneforge.config import load_config
    from tuneforge.data.prompts import prepare_prompts
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.models.load import load_tokenizer, resolve_precision

    cfg = resolve_model_source(load_config(RECIPE, tf_overrides(work, "prepare", steps, dtype)))
    s, rl, t, p = SETTINGS, cfg.rl, cfg.train, cfg.peft
    have = {"prompts_per_step": t.global_batch_size // rl.num_generations, "num_generations": rl.num_generations,
            "micro": t.micro_batch_size, "accumulation": t.global_batch_size // t.micro_batch_size,
            "max_completion_length": rl.max_completion_length, "temperature": rl.temperature, "top_p": rl.top_p,
            "top_k": rl.top_k, "beta": rl.beta, "loss_type": rl.loss_type, "scale_rewards": rl.scale_rewards,
            "lr": t.optimizer.lr, "grad_clip": t.grad_clip, "seed": cfg.run.seed,
            "lora": {"r": p.lora_rank, "alpha": p.lora_alpha, "dropout": p.lora_dropout,
                     "target_modules": p.target_modules}}
    wrong = {k: (have[k], v) for k, v in s.items() if have[k] != v}
    extra = {"rewards": [r.function for r in rl.rewards], "num_iterations": rl.num_iterations,
             "warmup_steps": t.lr_scheduler.warmup_steps, "scheduler": t.lr_scheduler.name,
             "weight_decay": t.optimizer.weight_decay, "mask_truncated_completions": rl.mask_truncated_completions,
             "epsilon": rl.epsilon, "epsilon_high": rl.epsilon_high}
    expect = {"rewards": ["squad_f1"], "num_iterations": 1, "warmup_steps": 0, "scheduler": "constant",
              "weight_decay": 0.0, "mask_truncated_completions": False, "epsilon": 0.2, "epsilon_high": None}
    wrong.update({k: (extra[k], v) for k, v in expect.items() if extra[k] != v})
    if wrong:
        raise SystemExit(f"{RECIPE} (with the benchmark's overrides) is not what TRL is given: "
                         + "; ".join(f"{k}: recipe {a!r}, benchmark {b!r}" for k, (a, b) in wrong.items()))
    tokenizer = load_tokenizer(cfg.model)
    train, _ = prepare_prompts(cfg.data, cfg.rl, tokenizer)
    need = steps * s["prompts_per_step"]
    if len(train.examples) < need:
        raise SystemExit(f"{len(train.examples)} prompts, {need} needed")
    prompts = []
    for p in train.examples[:need]:
        text = tokenizer.decode(p.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        prompts.append({"index": p.index, "ids": list(p.ids), "text": text,
                        "answers": list(p.columns.get("answers") or [])})
    bf16 = resolve_precision(cfg.model.dtype, "cpu").autocast is not None
    out = {"model_dir": str(cfg.model.name_or_path), "bf16": bf16, "prompts": prompts,
           "prompt_tokens": [len(p["ids"]) for p in prompts], "all_prompts": len(train.examples),
           "seq_length": cfg.data.seq_length, "system_prompt": cfg.data.system_prompt}
    (work / "prompts.json").write_text(json.dumps(out))
    return out


# ---- one side per process ------------------------------------------------------------------------------------------
def wait_child(cmd: list[str], log_path: Path, env: dict) -> tuple[int, float, float, float]:
    """(status, peak RSS MiB of that process from wait4, wall seconds, load average at the end)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.perf_counter() - started, \
        os.getloadavg()[0]


def tuneforge_child(trace_path: str, argv: list[str]) -> int:
    """--child-tuneforge TRACE ARGV...: tuneforge's CLI in this process, recording each generation's prompts."""
    import resource

    import torch

    from tuneforge.cli import main as cli_main
    from tuneforge.train import grpo

    order = []
    original = grpo.GRPOObjective.generate

    def traced(self, module, prompts, precision, env, step):
        order.append({"step": step + 1, "prompts": [p.index for p in prompts], "ids": [list(p.ids) for p in prompts]})
        return original(self, module, prompts, precision, env, step)

    grpo.GRPOObjective.generate = traced
    try:
        return cli_main(argv)
    finally:
        Path(trace_path).write_text(json.dumps({
            "order": order, "torch_threads": torch.get_num_threads(),
            "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_tuneforge(work: Path, name: str, steps: int, dtype: str) -> dict:
    trace = work / "logs" / f"{name}.trace.json"
    trace.unlink(missing_ok=True)
    argv = ["finetune", "-c", str(RECIPE), "--overwrite", *tf_overrides(work, name, steps, dtype)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-tuneforge", str(trace), *argv]
    log_path = work / "logs" / f"{name}.log"
    status, rss, wall, load = wait_child(cmd, log_path, child_env())
    text = log_path.read_text()
    if status != 0 or not trace.exists():
        raise SystemExit(f"tuneforge failed (status {status}): {' '.join(cmd)}\n{text[-5000:]}")
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    t = json.loads(trace.read_text())
    by_step = {o["step"]: o for o in t["order"]}
    steps_out = []
    for r in rows:
        if "loss" not in r:
            continue
        steps_out.append({
            "step": r["step"], "step_seconds": r["step_seconds"], "generation_seconds": r["generation_seconds"],
            "training_seconds": r["training_seconds"],
            "other_seconds": r["step_seconds"] - r["generation_seconds"] - r["training_seconds"],
            "completion_mean_length": r["completions/mean_length"], "completion_tokens": r.get("completion_tokens"),
            "reward": r["reward"], "loss": r["loss"], "grad_norm": r["grad_norm"],
            "prompts": by_step.get(r["step"], {}).get("prompts"), "peak_rss_mb": r.get("peak_rss_mb")})
    if len(steps_out) != steps:
        raise SystemExit(f"tuneforge logged {len(steps_out)} steps, expected {steps}: {log_path}")
    keep = ("precision", "rl:", "reference:", "data:", "trainable", "sampling stops", "model:", "peft", "batch")
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keep)][:20]
    return {"side": "tuneforge", "name": name, "command": "python -m tuneforge " + " ".join(argv),
            "process_command": " ".join(cmd), "steps": steps_out, "peak_rss_mb": rss, "wall_s": wall,
            "load_avg": load, "torch_threads": t["torch_threads"], "self_peak_rss_mb": t["self_peak_rss_mb"],
            "order_ids": [o["ids"] for o in t["order"]], "log_lines": lines, "log": str(log_path)}


def run_trl(work: Path, name: str, steps: int, bf16: bool, python: str, trl_path: str | None) -> dict:
    out = work / "trl" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [python, str(HERE / "grpo_speed_trl_side.py"), "--prompts", str(work / "prompts.json"), "--model",
           json.loads((work / "prompts.json").read_text())["model_dir"], "--out", str(out), "--steps", str(steps),
           "--settings", json.dumps(SETTINGS)] + (["--bf16"] if bf16 else [])
    log_path = work / "logs" / f"{name}.log"
    status, rss, wall, load = wait_child(cmd, log_path, child_env(trl_path))
    if status != 0 or not out.exists():
        raise SystemExit(f"TRL failed (status {status}): {' '.join(cmd)}\n{log_path.read_text()[-5000:]}")
    r = json.loads(out.read_text())
    return {"side": "trl", "name": name, "command": " ".join(cmd), "steps": r["steps"], "peak_rss_mb": rss,
            "wall_s": wall, "load_avg": load, "torch_threads": r["torch_threads"],
            "self_peak_rss_mb": r["self_peak_rss_mb"], "config": r["config"], "token_check": r["token_check"],
            "compute_dtype": r["compute_dtype"], "log": str(log_path)}


# ---- summaries -----------------------------------------------------------------------------------------------------
TIMES = ("step_seconds", "generation_seconds", "training_seconds", "other_seconds")


def summarize(run: dict) -> dict:
    rows = [r for r in run["steps"] if r["step"] >= FIRST] or run["steps"]  # --steps 1: step 1 itself
    out = {k: statistics.median(r[k] for r in rows) for k in TIMES}
    out["steps_in_median"] = [r["step"] for r in rows]
    out["peak_rss_mb"] = run["peak_rss_mb"]
    out["completion_mean_length"] = statistics.mean(r["completion_mean_length"] for r in run["steps"])
    out["reward"] = statistics.mean(r["reward"] for r in run["steps"])
    out["wall_s"], out["load_avg"], out["torch_threads"] = run["wall_s"], run["load_avg"], run["torch_threads"]
    return out


def pooled(runs: list[dict]) -> dict:
    """One number per side: the median of its runs' values (a run's value being its median over steps 2..N); peak
    RSS: the largest."""
    s = [r["summary"] for r in runs]
    out = {k: statistics.median(x[k] for x in s) for k in TIMES + ("completion_mean_length", "reward")}
    out["peak_rss_mb"] = max(x["peak_rss_mb"] for x in s)
    return out


def machine(trl_python: str, trl_path: str | None) -> dict:
    import peft
    import torch
    import transformers

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("Flags")), [])
    code = ("import json, peft, torch, transformers, trl; print(json.dumps({'trl': trl.__version__, 'torch': "
            "torch.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__, 'trl_file': "
            "trl.__file__}))")
    got = subprocess.run([trl_python, "-c", code], capture_output=True, text=True, env=child_env(trl_path))
    if got.returncode != 0:
        raise SystemExit(f"{trl_python} cannot import trl (pip install --no-deps trl==1.16.0, or --trl-path DIR):\n"
                         f"{got.stderr[-2000:]}")
    try:
        mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = None
    return {"cpu": model, "cpus": os.cpu_count(), "mem_gib": mem, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": json.loads(got.stdout.strip().splitlines()[-1]), "trl_python": trl_python, "trl_path": trl_path,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_avg_start": os.getloadavg()}


def checks(results: dict) -> dict:
    """Same prompts per step on both sides (indices and ids), TRL's tokenization, stop tokens."""
    prompts = results["prompts"]
    want = [[prompts[(s - 1) * SETTINGS["prompts_per_step"] + k]["index"] for k in range(SETTINGS["prompts_per_step"])]
            for s in range(1, results["settings"]["steps"] + 1)]
    ids = {p["index"]: p["ids"] for p in prompts}
    out = {"order": [], "tokens_equal": True}
    for run in results["runs"]:
        got = [r["prompts"] for r in run["steps"]]
        out["order"].append({"run": run["name"], "equal": got == want})
        if run["side"] == "tuneforge":
            same = all(x == [ids[i] for i in w] for x, w in zip(run["order_ids"], want))
            out["order"][-1]["ids_equal"] = same
        else:
            out["tokens_equal"] &= run["token_check"]["equal"]
    out["all_equal"] = all(o["equal"] and o.get("ids_equal", True) for o in out["order"]) and out["tokens_equal"]
    out["expected_order"] = want
    return out


def report(results: dict) -> str:
    m, st = results["machine"], results["settings"]
    t = m["trl"]
    tf_runs = [r for r in results["runs"] if r["side"] == "tuneforge"]
    trl_runs = [r for r in results["runs"] if r["side"] == "trl"]
    trl0 = trl_runs[0]
    n = st["steps"]
    med = f"steps {FIRST}-{n}" if n >= FIRST else "step 1"
    out = ["### GRPO speed and memory: tuneforge vs TRL 1.16 GRPOTrainer on the same CPU (no vLLM)", "",
           "Command:", "```", results["command"], "```",
           f"Machine: {m['cpus']} CPUs, {m['cpu']}"
           + (f", {m['mem_gib']:.0f} GiB" if m["mem_gib"] else "")
           + f" (avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, amx {'yes' if m['amx_bf16'] else 'no'}); "
           f"OMP_NUM_THREADS {m['OMP_NUM_THREADS'] or 'unset'}; torch threads tuneforge "
           f"{tf_runs[0]['torch_threads']}, TRL {trl0['torch_threads']}; load average {m['load_avg_start'][0]:.2f} at "
           f"the start, {results['load_avg_end'][0]:.2f} at the end. Python {m['python']}, torch {m['torch']}, "
           f"transformers {m['transformers']}, peft {m['peft']}; TRL side: trl {t['trl']}, torch {t['torch']}, "
           f"transformers {t['transformers']}, peft {t['peft']}. Total {results['wall_s']:.0f} s.", "",
           f"Workload (both sides): SmolLM2-135M-Instruct (tuneforge's GGUF, dequantized; TRL gets that directory, "
           f"fp32 weights), LoRA r16 / alpha 32 / dropout 0, all linear layers; precision "
           f"{'bf16 autocast' if results['bf16'] else 'fp32'} on both (the CPU "
           f"{'has' if results['bf16_native'] else 'has no'} bf16 matmuls; --dtype {results['dtype']}); "
           f"{st['prompts_per_step']} SQuAD prompts x {st['num_generations']} completions of <= "
           f"{st['max_completion_length']} tokens a step (prompts {min(results['prompt_tokens'])}-"
           f"{max(results['prompt_tokens'])} tokens, chat template, the same prompts per step on both sides), "
           f"temperature {st['temperature']}, top_p {st['top_p']:g}, top_k {st['top_k']}; SQuAD F1 reward; "
           f"beta {st['beta']:g}, loss {st['loss_type']}, scale_rewards {st['scale_rewards']}; micro-batch "
           f"{st['micro']} x {st['accumulation']}; AdamW lr {st['lr']:g} constant, clip {st['grad_clip']:g}. "
           f"{n} steps per side, {len(tf_runs)} run(s) per side; times are medians over {med}.", ""]
    tf, trl = results["summary"]["tuneforge"], results["summary"]["trl"]

    def ratio(k):
        return f"{trl[k] / tf[k]:.2f}x" if tf[k] else "-"
    out += ["| | tuneforge | TRL GRPOTrainer | TRL / tuneforge |", "|---|---|---|---|"]
    for k, label in (("step_seconds", "step s (median)"), ("generation_seconds", "generation s (sampling)"),
                     ("training_seconds", "training s (forward + backward)"),
                     ("other_seconds", "other s (rewards, advantages, optimizer, ...)")):
        out.append(f"| {label} | {tf[k]:.2f} | {trl[k]:.2f} | {ratio(k)} |")
    out.append(f"| peak RSS MiB (whole process) | {tf['peak_rss_mb']:,.0f} | {trl['peak_rss_mb']:,.0f} | "
               f"{ratio('peak_rss_mb')} |")
    out.append(f"| mean completion length, tokens (all steps) | {tf['completion_mean_length']:.1f} | "
               f"{trl['completion_mean_length']:.1f} | {ratio('completion_mean_length')} |")
    out.append(f"| mean reward (all steps) | {tf['reward']:.3f} | {trl['reward']:.3f} | - |")
    out.append("")
    out += ["Runs, in order:", "",
            "| run | side | step s | generation s | training s | other s | peak RSS MiB | process wall s | "
            "load avg after |", "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        s = run["summary"]
        out.append(f"| {run['name']} | {run['side']} | {s['step_seconds']:.2f} | {s['generation_seconds']:.2f} | "
                   f"{s['training_seconds']:.2f} | {s['other_seconds']:.2f} | {s['peak_rss_mb']:,.0f} | "
                   f"{s['wall_s']:.0f} | {s['load_avg']:.2f} |")
    out += ["", "Per step (first run of each side): step s, completion mean length (tokens), mean reward:", "",
            "| step | tuneforge step s | TRL step s | tuneforge length | TRL length | tuneforge reward | "
            "TRL reward |", "|---|---|---|---|---|---|---|"]
    for a, b in zip(tf_runs[0]["steps"], trl0["steps"]):
        out.append(f"| {a['step']} | {a['step_seconds']:.2f} | {b['step_seconds']:.2f} | "
                   f"{a['completion_mean_length']:.1f} | {b['completion_mean_length']:.1f} | {a['reward']:.3f} | "
                   f"{b['reward']:.3f} |")
    c = results["checks"]
    stops = next((ln for ln in tf_runs[0]["log_lines"] if "sampling stops" in ln), "?")
    out += ["", f"Checks: prompts per step identical on both sides (indices; tuneforge's ids; TRL's tokenization of "
            f"the text == tuneforge's ids, no BOS added): {'yes' if c['all_equal'] else 'NO'} "
            f"(step -> prompt indices: {dict(enumerate(c['expected_order'][:3], 1))}{' ...' if n > 3 else ''}). "
            f"Stop tokens: TRL eos ids {trl0['config']['eos_token_ids']}; tuneforge `{stops.split('sampling ')[-1]}`. "
            f"TRL computed in {trl0['compute_dtype'].get('generation', '?')} while generating and "
            f"{trl0['compute_dtype'].get('training', '?')} while training (an adapted q_proj's output dtype); "
            f"optimizer {trl0['config']['optim']} (fused {trl0['config']['fused']}); activation checkpointing "
            f"{trl0['config']['activation_checkpointing']}.",
            f"tuneforge's log: {'; '.join(ln for ln in tf_runs[0]['log_lines'] if 'precision' in ln or 'rl:' in ln)}"]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-tuneforge":
        sys.exit(tuneforge_child(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per side (medians over steps 2..N)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each runs both sides, who goes first alternating")
    ap.add_argument("--dtype", choices=("auto", "float32"), default="auto",
                    help="auto: bf16 autocast on both sides where the CPU has bf16 matmuls (tuneforge's choice)")
    ap.add_argument("--work", default="/tmp/tuneforge-bench-grpo-speed")
    ap.add_argument("--out", default=None, help="results json (default WORK/results.json)")
    ap.add_argument("--trl-python", default=sys.executable, help="the TRL side's interpreter (default: this one)")
    ap.add_argument("--trl-path", default=None, help="a directory prepended to the TRL side's PYTHONPATH (an "
                                                      "unpacked trl, e.g. /tmp/trlpkgs)")
    args = ap.parse_args()
    if args.steps < 1 or args.repeat < 1:
        ap.error("--steps and --repeat must be >= 1")
    os.chdir(REPO)  # the recipe's paths are relative to the repository
    started = time.perf_counter()
    work = Path(args.work).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(["python"] + sys.argv), "machine": machine(args.trl_python, args.trl_path),
                     "settings": {**SETTINGS, "steps": args.steps, "repeat": args.repeat, "median_from_step": FIRST},
                     "dtype": args.dtype, "recipe": str(RECIPE), "runs": []}
    print("[prepare] prompts ...", flush=True)
    prep = prepare(work, args.steps, args.dtype)
    from tuneforge.models.load import resolve_precision
    results.update(bf16=prep["bf16"], bf16_native=resolve_precision("auto", "cpu").autocast is not None,
                   model_dir=prep["model_dir"], prompts=prep["prompts"], prompt_tokens=prep["prompt_tokens"])
    for k in range(args.repeat):
        order = ("tuneforge", "trl") if k % 2 == 0 else ("trl", "tuneforge")
        for side in order:
            name = f"{side}-{k + 1}"
            print(f"[round {k + 1}] {side} ({args.steps} steps) ...", flush=True)
            run = (run_tuneforge(work, name, args.steps, args.dtype) if side == "tuneforge" else
                   run_trl(work, name, args.steps, prep["bf16"], args.trl_python, args.trl_path))
            run["summary"] = summarize(run)
            s = run["summary"]
            print(f"[round {k + 1}] {side}: step {s['step_seconds']:.2f} s (generation {s['generation_seconds']:.2f}, "
                  f"training {s['training_seconds']:.2f}), peak RSS {s['peak_rss_mb']:,.0f} MiB, mean length "
                  f"{s['completion_mean_length']:.1f}, reward {s['reward']:.3f}", flush=True)
            results["runs"].append(run)
    results["summary"] = {side: pooled([r for r in results["runs"] if r["side"] == side])
                          for side in ("tuneforge", "trl")}
    results["checks"] = checks(results)
    results["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    publish(results, report(results), args.out, work, "per-step values of every run, logs, commands")
    if not results["checks"]["all_equal"]:
        raise SystemExit("the two sides did not get the same prompts per step (see checks in the results)")


if __name__ == "__main__":
    main()
