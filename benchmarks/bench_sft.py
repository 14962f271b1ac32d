"""LoRA SFT speed, side by side: tuneforge (its real CLI path) against TRL's SFTTrainer + PEFT, same model, data,
hyper-parameters and machine, alternating in one invocation.

    pip install trl==1.16.0            # the other side; tuneforge itself does not need it
    python benchmarks/bench_sft.py --steps 12 [--sides tuneforge,tuneforge-unpacked,trl-a,trl-b] [--rounds 1]

The benchmark
  model   LlamaConfig(vocab 50257 (GPT-2 tokenizer, pad = eos), hidden 512, intermediate 1408, 8 layers, 8 heads,
          8 kv heads, 1024 positions, untied head), weights from torch.manual_seed(0): ~77M parameters. Built once
          into --work, never committed.
  data    SQuAD v1.1 train (../shared/data, else the shipped sample) in file order: prompt
          "Context: {context} Question: {question} Answer:", completion " {answer}" + eos, loss on the completion
          only, keeping examples of <= 512 tokens. Both sides read the same prompt/completion pairs, unshuffled.
  train   LoRA r16, alpha 32, dropout 0, every linear layer of the decoder; AdamW lr 2e-4, linear decay to 0 over
          --steps (TRL's default schedule, copied on the tuneforge side), grad-norm clip 1.0, micro batch 8,
          no accumulation, seq_length 512, bf16 autocast over fp32 master weights.
  sides   tuneforge           packing (8 rows of 512 tokens per step) and train.compile, defaults otherwise
          tuneforge-unpacked  pad_longest, no compile: the same examples per step as trl-a (the loss comparison)
          tuneforge:LEVER     (--levers) the tuneforge side with one lever switched, see LEVERS
          trl-a               TRL defaults for everything not named above (bf16, gradient checkpointing, no packing)
          trl-b               TRL tuned: bf16, no gradient checkpointing, packing=True, padding_free=True

What is reported (median over steps 4..N, per side): real tokens/s (example tokens, padding excluded), step time,
peak resident memory of the side's process, MFU, and the mean loss of the last 4 steps.

How MFU counts FLOPs (model FLOPs: recomputation by gradient checkpointing is not counted as useful work):
  per real token   2 x P_body forward + 2 x P_body backward (the base weights are frozen: gradients of the inputs
                   only, no weight gradients) + 2 x P_lora forward + 4 x P_lora backward (inputs and weights), where
                   P_body = the decoder's linear weights (q,k,v,o,gate,up,down) and P_lora = the adapters' r x (in+out)
  per label token  the LM head: 2 x d x V forward + 2 x d x V backward (the gradient of the hidden state). Positions
                   without a label need no logits, so the head is counted where a label is, for both sides alike.
  attention        causal QK^T and AV: per layer and example of n tokens, 2 x 2 x d x n(n+1)/2 FLOPs forward and
                   twice that backward. Counted per real token from the benchmark data's n^2/n ratio (the mean
                   context a token attends to), not per step: attention is ~3% of the total here.
  peak             the best bf16 matmul throughput this script measures on this machine, over a 4096^3 product and
                   the model's own GEMM shapes at 4096 tokens (torch.matmul, the same threads as training).
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
SHARED = REPO.parent / "shared"
SIDES = ("tuneforge", "tuneforge-unpacked", "trl-a", "trl-b")
# --levers: the tuneforge side with one lever switched (the recipe key each sits behind)
LEVERS = {"no-compile": {"train": {"compile": False}}, "fp32": {"model": {"dtype": "float32"}},
          "no-packing": {"data": {"batching": "pad_longest"}, "train": {"compile": False}},
          "full-head": {"train": {"head_on_labels_only": False}}, "frozen-fp32": {"model": {"frozen_dtype": "float32"}},
          "unfused-adamw": {"train": {"optimizer": {"fused": False}}},
          "checkpointing": {"distributed": {"activation_checkpointing": True}}, "workers": {"data": {"num_workers": 1}},
          "no-memory-release": {"train": {"release_memory_every_steps": None}}}
MODEL = dict(vocab_size=50257, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False)
LORA_R, LORA_ALPHA, LR, MICRO, SEQ = 16, 32, 2e-4, 8, 512
PROMPT = "Context: {context} Question: {question} Answer:"


# ---- the shared inputs -------------------------------------------------------------------------------------------
def build_model(work: Path, tokenizer_dir: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "model"
    if (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    for extra in tokenizer_dir.glob("LICENSE*"):
        shutil.copy(extra, out)
    return out


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


def flops_per_token(context_per_token: float) -> tuple[float, float]:
    """(FLOPs per real token, FLOPs per label token) of one training step; see the module docstring."""
    d, ff = MODEL["hidden_size"], MODEL["intermediate_size"]
    layers, vocab = MODEL["num_hidden_layers"], MODEL["vocab_size"]
    shapes = [(d, d)] * 4 + [(d, ff), (d, ff), (ff, d)]  # q k v o, gate up down
    p_body = layers * sum(i * o for i, o in shapes)
    p_lora = layers * sum(LORA_R * (i + o) for i, o in shapes)
    attention = layers * 3 * (2 * 2 * d * context_per_token)
    return 4 * p_body + 6 * p_lora + attention, 4 * d * vocab


def measure_peak() -> dict:
    import torch

    d, ff, t = MODEL["hidden_size"], MODEL["intermediate_size"], MICRO * SEQ
    best = {}
    for m, k, n in [(4096, 4096, 4096), (t, d, ff), (t, ff, d), (t, d, d), (t, d, MODEL["vocab_size"] // 4)]:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.5:
            a @ b
            reps += 1
        best[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - started)
    return {"peak_flops": max(best.values()), "by_shape": best}


# ---- one side per process ----------------------------------------------------------------------------------------
def merge(base: dict, change: dict) -> dict:
    return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in change.items()}}


def run_tuneforge(work: Path, steps: int, side: str) -> list[dict]:
    import yaml

    from tuneforge.cli import main as cli

    packed = side != "tuneforge-unpacked"
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
                  "lr_scheduler": {"name": "linear", "warmup_steps": 0}, "grad_clip": 1.0, "log_every_steps": 1,
                  "compile": packed},
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned_args = dict(bf16=True, gradient_checkpointing=False, packing=True, padding_free=True) if tuned else {}
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
    rows = [r for r in result["rows"] if r["step"] >= 4]
    seconds = statistics.median(r["seconds"] for r in rows)
    tps = statistics.median(r["tokens"] / r["seconds"] for r in rows)
    flops = statistics.median((r["tokens"] * per_token + r["labels"] * per_label) / r["seconds"] for r in rows)
    last = result["rows"][-4:]
    return {"side": side, "tokens_per_s": tps, "step_s": seconds, "tokens_per_step": statistics.median(
        r["tokens"] for r in rows), "peak_rss_gb": result["peak_rss_gb"], "mfu": flops / peak,
        "loss_last4": sum(r["loss"] for r in last) / len(last), "losses": [r["loss"] for r in result["rows"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternation; the table uses the best round")
    ap.add_argument("--examples", type=int, default=2000, help="SQuAD questions to keep (enough for --steps)")
    ap.add_argument("--work", default="/tmp/tuneforge-bench-sft")
    ap.add_argument("--levers", action="store_true", help="run the tuneforge side once per lever switched (LEVERS)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        return child(args.child, work, args.steps, work / f"{args.child}.json")

    import torch
    import transformers

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = SHARED / "models" / "gpt2-tokenizer"
    squad = SHARED / "data" / "squad_v1.1" / "train-v1.1.json"
    if not squad.exists():
        squad = REPO / "assets" / "data" / "squad" / "train.json"
    if not tokenizer.exists():
        raise SystemExit(f"the GPT-2 tokenizer is expected in {tokenizer}")
    build_model(work, tokenizer)
    data = build_data(work, work / "model", squad, args.examples)
    per_token, per_label = flops_per_token(data["context_per_token"])
    peak = measure_peak()
    sides = ["tuneforge"] + [f"tuneforge:{k}" for k in LEVERS] if args.levers else args.sides.split(",")
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for side in sides:
            result = summarize(side, run_side(side, work, args.steps), per_token, per_label, peak["peak_flops"])
            if side not in results or result["tokens_per_s"] > results[side]["tokens_per_s"]:
                results[side] = result
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    print(f"\n{data['examples']} SQuAD examples ({data['source']}), {args.steps} steps, median of steps "
          f"4-{args.steps}; "
          f"bf16 matmul peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s; python {platform.python_version()}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| side | real tokens/s | step s | real tokens/step | peak RSS GiB | MFU | loss (last 4 steps) |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['side']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['tokens_per_step']:,.0f} | "
              f"{r['peak_rss_gb']:.2f} | {100 * r['mfu']:.1f}% | {r['loss_last4']:.4f} |")
    for ours in ("tuneforge", "tuneforge-unpacked"):
        for theirs in ("trl-a", "trl-b"):
            if ours in results and theirs in results:
                a, b = results[ours], results[theirs]
                print(f"{ours} / {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                      f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak memory, loss "
                      f"{100 * (a['loss_last4'] / b['loss_last4'] - 1):+.2f}%")
    for side, r in results.items():
        if side.startswith("tuneforge:") and "tuneforge" in results:
            print(f"{side}: {r['tokens_per_s'] / results['tuneforge']['tokens_per_s']:.2f}x the tokens/s of all levers "
                  f"on, {r['peak_rss_gb'] / results['tuneforge']['peak_rss_gb']:.2f}x its peak memory")
    (work / "results.json").write_text(json.dumps({"peak": peak, "data": data, "results": results}, indent=1))
    print(f"per-step losses and the peak by shape: {work / 'results.json'}")


if __name__ == "__main__":
    main()
