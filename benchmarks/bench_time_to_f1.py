"""Time to quality: wall time from the start of training until SQuAD F1 on 100 dev questions first reaches a target
(60), for tuneforge's quickstart recipe and for TRL's SFTTrainer + PEFT careful for this machine (TRL (b) of
bench_sft.py), same model, data, hyper-parameters and machine, alternating in one invocation. Both sides' adapters
are scored afterwards by the same `tuneforge eval`.

    make setup && pip install trl==1.16.0 --no-deps
    python benchmarks/bench_time_to_f1.py [--target 60] [--trl-steps 80]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_time_to_f1.py   # a CPU without bf16

The two sides
  tuneforge  `tuneforge finetune -c recipes/quickstart.yaml` as shipped (SmolLM2-135M-Instruct, LoRA r16 alpha 32 on
             every linear layer, the 2,000 shipped SQuAD questions through the chat template, packing, 4 rows of 512
             tokens a step as micro 2 x accumulation 2, AdamW lr 1e-3, cosine with 3 warmup steps, clip 1.0, 20
             steps), with its in-run scoring off and a checkpoint every --every steps instead.
  trl-b      the same base weights in fp32 (bf16 autocast only where the CPU has bf16 matmuls: tuneforge's own test,
             for both sides alike), the same LoRA, optimizer, lr, warmup, cosine decay, clip and 4 sequences of <= 512
             tokens a step (micro 4: faster for TRL than 2 x 2), no packing (on CPU TRL's padding_free makes one row of
             a micro-batch), no gradient checkpointing, TRL's own shuffling (seed 42). It trains on exactly the
             token ids and loss masks tuneforge tokenized (passed to TRL as a pre-tokenized dataset), so both read
             the same examples, differently batched. Its schedule decays over --trl-steps; it saves its adapter every
             --trl-every steps.

The clock starts when the side's process is launched (imports, model load and tokenization count) and reads the
time each adapter was saved (saving counts too; tuneforge's checkpoints also hold its optimizer state). Scoring
happens after both sides have trained, so it costs neither side time. Checkpoints are scored in order, each side
stopping at its first F1 >= target unless --full-curve.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_sft import machine_has_bf16, trl_version  # this script's directory is on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"


def quickstart() -> dict:
    return yaml.safe_load(RECIPE.read_text())


# ---- the shared inputs -------------------------------------------------------------------------------------------
def build_inputs(work: Path) -> dict:
    """The quickstart's base model directory (dequantized from its GGUF once, before either clock starts) and the
    token ids + loss masks tuneforge makes of its training set, as a jsonl TRL reads pre-tokenized."""
    from tuneforge.config import load_config
    from tuneforge.data.prepare import prepare_data
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.models.load import load_tokenizer

    out = work / "trl_data.jsonl"
    os.chdir(REPO)  # the recipe's paths are relative to the repository
    cfg = resolve_model_source(load_config(RECIPE))
    model_dir = Path(cfg.model.name_or_path)
    if not out.exists():
        tokenizer = load_tokenizer(cfg.model)
        train, _ = prepare_data(cfg.data, tokenizer, cfg.run.seed, progress=False)
        table = train.examples
        with open(out.with_suffix(".tmp"), "w") as f:
            for i in range(len(table)):
                a, b = int(table.offsets[i]), int(table.offsets[i + 1])
                ids, mask = table.ids[a:b].tolist(), table.mask[a:b].tolist()
                f.write(json.dumps({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}) + "\n")
        out.with_suffix(".tmp").rename(out)
    return {"model_dir": str(model_dir), "data": str(out)}


# ---- the sides, each in a fresh process --------------------------------------------------------------------------
def train_tuneforge(work: Path, every: int) -> list[dict]:
    """The quickstart recipe through the real command line; a checkpoint's time is when its manifest was written."""
    from tuneforge.checkpoint import MANIFEST, WEIGHTS

    runs = work / "runs"
    overrides = [f"run.output_dir={runs}", "run.name=tuneforge", "eval.squad=null", "data.validation=null",
                 f"checkpoint.every_steps={every}", "checkpoint.keep_last=null", "logging.tensorboard=false",
                 "logging.progress=false"]
    started = time.time()
    subprocess.run([sys.executable, "-m", "tuneforge", "finetune", "-c", str(RECIPE), "--overwrite", *overrides],
                   cwd=REPO, check=True)
    saved = []
    for step_dir in sorted((runs / "tuneforge" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])):
        saved.append({"step": int(step_dir.name[5:]), "seconds": (step_dir / MANIFEST).stat().st_mtime - started,
                      "weights": str(step_dir / WEIGHTS)})
    return saved


def train_trl(work: Path, inputs: dict, steps: int, every: int, started: float) -> list[dict]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    recipe = quickstart()
    train, peft_cfg = recipe["train"], recipe["peft"]
    saved: list[dict] = []

    class Clock(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved.append({"step": state.global_step, "seconds": time.time() - started,
                          "weights": str(Path(args.output_dir) / f"checkpoint-{state.global_step}"
                                         / "adapter_model.safetensors")})

    tok = AutoTokenizer.from_pretrained(inputs["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(inputs["model_dir"], dtype=torch.float32)
    out = work / "trl-out"
    shutil.rmtree(out, ignore_errors=True)
    args = SFTConfig(output_dir=str(out), use_cpu=True, max_steps=steps, per_device_train_batch_size=4,
                     learning_rate=train["optimizer"]["lr"], weight_decay=train["optimizer"]["weight_decay"],
                     lr_scheduler_type=train["lr_scheduler"]["name"],
                     warmup_steps=train["lr_scheduler"]["warmup_steps"], max_grad_norm=train["grad_clip"],
                     max_length=recipe["data"]["seq_length"], bf16=machine_has_bf16(), gradient_checkpointing=False,
                     logging_steps=1, report_to="none", save_strategy="steps", save_steps=every, save_only_model=True,
                     seed=recipe["run"]["seed"])
    data = load_dataset("json", data_files=inputs["data"], split="train")
    lora = LoraConfig(r=peft_cfg["lora_rank"], lora_alpha=peft_cfg["lora_alpha"], lora_dropout=peft_cfg["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora,
               callbacks=[Clock()]).train()
    return saved


def run_child(side: str, work: Path, argv: list[str]) -> list[dict]:
    out = work / f"{side}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, __file__, "--child", side, "--started", repr(time.time()), "--work", str(work),
                    *argv], env=env, check=True)
    return json.loads(out.read_text())


# ---- scoring -----------------------------------------------------------------------------------------------------
def adapter_state(weights: Path) -> dict:
    """An adapter file as peft saves it: tuneforge's checkpoints name the live parameters (`...lora_A.default.weight`),
    peft's adapter files drop the adapter name."""
    from safetensors.torch import load_file

    return {k.replace(".default.", "."): v for k, v in load_file(weights).items()}


def score(work: Path, side: str, point: dict, limit: int) -> dict:
    """Score one saved adapter with `tuneforge eval`: a run directory made of the tuneforge run's recorded config
    (with the quickstart's scoring section back) and final/ holding this adapter."""
    from safetensors.torch import save_file

    run = work / "runs" / "tuneforge"
    target = work / "scored" / f"{side}-step{point['step']}"
    shutil.rmtree(target, ignore_errors=True)
    (target / "final").mkdir(parents=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"]["squad"] = quickstart()["eval"]["squad"]
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for f in (run / "final").iterdir():
        if f.name != "adapter_model.safetensors":
            shutil.copy(f, target / "final" / f.name)
    save_file(adapter_state(Path(point["weights"])), target / "final" / "adapter_model.safetensors")
    shown = subprocess.run([sys.executable, "-m", "tuneforge", "eval", "--run", str(target), "--limit", str(limit)],
                           cwd=REPO, check=True, capture_output=True, text=True).stdout
    scores = json.loads(shown[shown.index("{"):])
    return {**point, "f1": scores["squad_f1"], "em": scores["squad_em"]}


def curve(work: Path, side: str, points: list[dict], limit: int, target: float, full: bool) -> list[dict]:
    scored = []
    for point in points:
        scored.append(score(work, side, point, limit))
        print(f"{side} step {point['step']}: {point['seconds']:.0f} s, F1 {scored[-1]['f1']:.1f}", flush=True)
        if scored[-1]["f1"] >= target and not full:
            break
    return scored


def first_reach(scored: list[dict], target: float) -> dict | None:
    return next((p for p in scored if p["f1"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=60.0, help="SQuAD F1 to reach")
    ap.add_argument("--limit", type=int, default=100, help="dev questions scored (the first N)")
    ap.add_argument("--every", type=int, default=4, help="tuneforge: a checkpoint every N steps (of 20)")
    ap.add_argument("--trl-steps", type=int, default=80, help="TRL's max_steps (its cosine decays over them)")
    ap.add_argument("--trl-every", type=int, default=5, help="TRL: save the adapter every N steps")
    ap.add_argument("--sides", default="tuneforge,trl-b")
    ap.add_argument("--full-curve", action="store_true", help="score every checkpoint, not only up to the target")
    ap.add_argument("--score-only", action="store_true", help="score the sides trained by the last invocation")
    ap.add_argument("--work", default="/tmp/tuneforge-bench-time-to-f1")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.child:
        inputs = json.loads((work / "inputs.json").read_text())
        saved = train_trl(work, inputs, args.trl_steps, args.trl_every, args.started)
        (work / f"{args.child}.json").write_text(json.dumps(saved))
        return

    import torch
    import transformers

    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs.json").write_text(json.dumps(build_inputs(work)))
    trained = json.loads((work / "trained.json").read_text()) if args.score_only else {}
    trl_args = ["--trl-steps", str(args.trl_steps), "--trl-every", str(args.trl_every)]
    for side in [] if args.score_only else args.sides.split(","):
        trained[side] = train_tuneforge(work, args.every) if side == "tuneforge" else run_child(side, work, trl_args)
    (work / "trained.json").write_text(json.dumps(trained))
    if "tuneforge" not in trained:
        raise SystemExit("scoring reads the tuneforge run's config: include the tuneforge side")
    scored = {side: curve(work, side, points, args.limit, args.target, args.full_curve)
              for side, points in trained.items()}
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"\nTime to SQuAD F1 {args.target:g} (first {args.limit} dev questions); CPU ISA {isa}, bf16 matmuls "
          f"{'yes' if machine_has_bf16() else 'no'}; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl_version()}, {os.cpu_count()} CPUs")
    print("| side | step | seconds since launch | EM | F1 |")
    print("|---|---|---|---|---|")
    for side, points in scored.items():
        for p in points:
            print(f"| {side} | {p['step']} | {p['seconds']:.0f} | {p['em']:.1f} | {p['f1']:.1f} |")
    reached = {side: first_reach(points, args.target) for side, points in scored.items()}
    for side, p in reached.items():
        print(f"{side}: " + (f"F1 {p['f1']:.1f} at step {p['step']}, {p['seconds']:.0f} s after launch" if p else
                             f"F1 {args.target:g} not reached in {trained[side][-1]['step']} steps"))
    if reached.get("tuneforge") and reached.get("trl-b"):
        print(f"trl-b / tuneforge time to F1 {args.target:g}: "
              f"{reached['trl-b']['seconds'] / reached['tuneforge']['seconds']:.2f}x")
    (work / f"results-{isa}.json").write_text(json.dumps(scored, indent=1))


if __name__ == "__main__":
    main()
