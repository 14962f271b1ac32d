"""`tuneforge plan`'s peak-memory estimate against the peak resident memory of the same recipe's training process.

    python benchmarks/bench_plan.py [--steps 10]

Three recipe sizes, each planned (`tuneforge plan`) and then trained for --steps steps in a fresh process whose
peak RSS comes from the kernel (wait4): the shipped quickstart (SmolLM2-135M-Instruct, LoRA, packing, micro 2 x 512, accumulation 2) and
the bench_sft.py model (77M-parameter Llama, GPT-2 vocabulary) with LoRA and packing (micro 8 x 512) and with full
fine-tuning and packing (micro 4 x 512). The plan counts full rows of seq_length, which packing trains.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path


from bench_sft import REPO, SHARED, build_data, build_model


def recipes(work: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (recipe file, overrides)"""
    model = str(work / "model")
    data = [f"data.train.path={work / 'squad_io.jsonl'}", "data.train.format=input_output", "data.validation=null",
            "data.seq_length=512", f"model.name_or_path={model}", "eval.squad=null", "data.prompt_style=plain"]
    return {
        "quickstart (SmolLM2-135M, LoRA, packing, micro 2 x 512, accumulation 2)": ("recipes/quickstart.yaml", ["eval.squad=null"]),
        "77M Llama, LoRA, packing, micro 8 x 512": (
            "recipes/quickstart.yaml", data + ["data.batching=packing", "train.micro_batch_size=8",
                                               "train.global_batch_size=8"]),
        "77M Llama, full fine-tuning, packing, micro 4 x 512": (
            "recipes/quickstart.yaml", data + ["peft=null", "data.batching=packing", "train.micro_batch_size=4",
                                               "train.global_batch_size=4",
                                               "train.optimizer.lr=1e-5"]),
    }


def planned_peak(recipe: str, overrides: list[str]) -> float:
    out = subprocess.run([sys.executable, "-m", "tuneforge", "plan", "-c", recipe, *overrides], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"peak \(estimate\)\s+([\d.]+)", out).group(1))


def measured_peak(recipe: str, overrides: list[str], steps: int, work: Path, name: str) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "finetune", "-c", recipe, *overrides, "--overwrite",
                             f"run.name={name}", f"run.output_dir={work / 'plan-runs'}", f"train.max_steps={steps}",
                             "checkpoint.every_steps=null", "logging.progress=false"], cwd=REPO,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name}: training failed ({status})")
    return usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--work", default="/tmp/tuneforge-bench-sft")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build_model(work, SHARED / "models" / "gpt2-tokenizer")
    squad = SHARED / "data" / "squad_v1.1" / "train-v1.1.json"
    build_data(work, work / "model", squad if squad.exists() else REPO / "assets/data/squad/train.json", 2000)
    print(f"| recipe | planned peak GiB | measured peak RSS GiB ({args.steps} steps) | planned / measured |")
    print("|---|---|---|---|")
    for i, (name, (recipe, overrides)) in enumerate(recipes(work).items()):
        planned = planned_peak(recipe, overrides)
        measured = measured_peak(recipe, overrides, args.steps, work, f"plan{i}")
        print(f"| {name} | {planned:.2f} | {measured:.2f} | {planned / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
