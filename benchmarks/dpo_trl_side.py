"""The TRL side of the DPO parity benchmark: TRL's own DPOTrainer, configured to train exactly what the tuneforge side
trains, so that the two per-step curves can be compared number for number.

    pip install --no-deps trl==1.16.0     # the other side; tuneforge itself does not need it
                                          # (or a virtualenv of its own: bench_dpo.py --trl-python)
    python benchmarks/dpo_trl_side.py --pairs pairs.jsonl --model assets/models/stories260K --out trl.json \\
        --loss-type sigmoid --beta 0.1 --steps 10 --micro-batch 2 --accumulation 2 --lr 1e-4 --max-length 128 \\
        [--lora '{"r": 8, "alpha": 16, "init_adapter": "path/to/adapter"}'] [--seed 0]

or, from Python, `run_trl(...)` with the same arguments (see its docstring). Run one side per process: the peak
resident memory reported is the process's own (getrusage), as on the tuneforge side.

What is trained
  data       `pairs` is a jsonl of {"prompt", "chosen", "rejected"} strings. The first steps x micro x accumulation
             rows are used once each, IN FILE ORDER (train_sampling_strategy="sequential"; checked on every
             micro-batch against the tokenized rows), so step i sees rows [(i-1)*m*k, i*m*k). There must be enough
             rows: a second epoch, or a short last step, would not be what the other side trains.
  tokens     TRL 1.16's own preprocessing, untouched: eos text appended to chosen/rejected if missing; prompt and
             prompt+chosen / prompt+rejected each tokenized with the tokenizer's special tokens (the BOS of a Llama
             tokenizer); the completion starts where the tokenized prompt and prompt+completion diverge; each
             prompt+completion truncated to max_length keeping the start; right padding with pad (= eos if none).
  loss       TRL's `loss_type` with `beta`; per-sequence log-probs summed over completion tokens (ipo divides them by
             the completion length); mean over the micro-batch's pairs, divided by the accumulation steps.
  model      fp32 on CPU, no autocast (bf16/fp16 off: TRL turns bf16 on by default), dropout off, no gradient
             checkpointing (TRL turns it on by default). Full fine-tuning: the reference is a second copy of the
             model loaded from `model_dir`. LoRA (`lora` dict): a fresh adapter (`peft_config`; the reference is the
             base model, adapter disabled) or the adapter in `lora["init_adapter"]` (TRL copies it into a frozen
             "ref" adapter, the reference; both sides can then start from identical LoRA weights).
  optimizer  torch.optim.AdamW through the Trainer, fused kernel (optim="adamw_torch_fused", the default of
             transformers on torch >= 2.8 and of tuneforge on CPU), betas (0.9, 0.999), eps 1e-8, weight decay 0,
             constant lr, no warmup, global grad-norm clip 1.0 (both sides' default).

What is written to `out_json`
  steps         one entry per optimizer step: the exact (unrounded) numbers TRL logs for it with logging_steps=1
                ("loss": the mean of the micro-batch losses; "rewards/*", "logps/*": the mean over micro-batches of
                TRL's per-micro-batch means), "grad_norm" (before clipping), "tokens" (real tokens forwarded: the
                non-padding tokens of the prompt+chosen and prompt+rejected sequences, after truncation, counted
                once although the policy and the reference both see them) and "step_seconds" (from fetching the
                step's micro-batches to the end of its optimizer step, as tuneforge measures it).
  peak_rss_mb   this process's peak resident memory (ru_maxrss), model loading and the reference copy included.
  tokens_per_s  sum of "tokens" / sum of "step_seconds" over all steps (the per-step rows allow other windows).
  token_ids     [prompt_ids, chosen_ids, rejected_ids] of every pair as TRL tokenized it (before truncation).
  trl_version, and "config": the settings used, so a result file says what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

# A benchmark does not phone home: TRL's trainers send a telemetry ping at construction unless told not to.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OPTIM = "adamw_torch_fused"  # torch.optim.AdamW(fused=True): what tuneforge builds on CPU by default
MAX_GRAD_NORM = 1.0  # tuneforge's train.grad_clip default and TRL's max_grad_norm default
LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")


def _read_pairs(path: str) -> list[dict]:
    """The jsonl rows, in file order, keeping only the three fields DPO reads (plain strings)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{path}:{n}: a row needs string 'prompt', 'chosen' and 'rejected'")
        rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    return rows


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trl(pairs_path: str, model_dir: str, out_json: str, loss_type: str, beta: float, steps: int,
            micro_batch: int, accumulation: int, lr: float, lora: dict | None, max_length: int,
            seed: int = 0) -> dict:
    """Train TRL's DPOTrainer for `steps` optimizer steps of `micro_batch` pairs x `accumulation` micro-batches on the
    first steps * micro_batch * accumulation rows of `pairs_path`, in file order, and write the per-step log to
    `out_json` (also returned). `lora`: None = full fine-tuning, else {"r", "alpha", "target_modules" (default
    "all-linear"), "dropout" (default 0), "init_adapter" (optional adapter directory to start from)}."""
    import torch
    import trl
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if steps < 1 or micro_batch < 1 or accumulation < 1:
        raise ValueError("steps, micro_batch and accumulation must be >= 1")
    disable_progress_bars()  # the dataset map() bars of TRL's preprocessing
    needed = steps * micro_batch * accumulation
    pairs = _read_pairs(pairs_path)
    if len(pairs) < needed:
        raise ValueError(f"{pairs_path}: {len(pairs)} pairs, {steps} steps x {micro_batch} x {accumulation} need "
                         f"{needed} (one pass in file order)")
    pairs = pairs[:needed]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # what DPOTrainer would do too; done here so the pad id is known up front
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    peft_config = None
    lora_desc = None
    if lora is not None:
        from peft import LoraConfig, PeftModel

        r, alpha = int(lora["r"]), float(lora["alpha"])
        dropout = float(lora.get("dropout", 0.0))
        target_modules = lora.get("target_modules", "all-linear")
        init_adapter = lora.get("init_adapter")
        if init_adapter:
            # A PeftModel without peft_config: DPOTrainer copies its "default" adapter into a frozen "ref" adapter
            # and computes the reference log-probs with "ref" active (dpo_trainer.py 666-694, 1328-1336).
            model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
            cfg = model.peft_config["default"]
            if (cfg.r, float(cfg.lora_alpha), float(cfg.lora_dropout)) != (r, alpha, dropout):
                raise ValueError(f"{init_adapter}: adapter has r={cfg.r}, alpha={cfg.lora_alpha}, "
                                 f"dropout={cfg.lora_dropout}; the lora dict says r={r}, alpha={alpha}, "
                                 f"dropout={dropout}")
        else:
            # A fresh adapter (A seeded by DPOTrainer's set_seed(args.seed), B = 0); reference = adapter disabled.
            peft_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                                     bias="none", task_type="CAUSAL_LM")
        lora_desc = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules,
                     "init_adapter": init_adapter}

    # Filled by the trainer subclass and the callback below, one entry per optimizer step.
    steps_log: list[dict] = []
    micro_tokens: list[int] = []  # real tokens of the micro-batches of the step in progress
    clock = {"start": None}
    order = {"next_row": 0}

    class FileOrderDPOTrainer(DPOTrainer):
        """DPOTrainer that records, per optimizer step, when it starts fetching micro-batches and the real tokens it
        forwards, and checks that the micro-batches are the dataset's rows in file order."""

        def get_batch_samples(self, *args, **kwargs):
            # Called once per optimizer step, before its micro-batches are fetched and collated.
            clock["start"] = time.perf_counter()
            micro_tokens.clear()
            return super().get_batch_samples(*args, **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            half = ids.size(0) // 2  # the collator puts the micro-batch's chosen rows first, then its rejected rows
            for j in range(half):
                row = self.train_dataset[order["next_row"] + j]
                want = (row["prompt_ids"] + row["chosen_ids"])[:max_length]
                got = ids[j, : int(mask[j].sum())].tolist()
                if got != want:
                    raise RuntimeError(f"micro-batch row {j} is not dataset row {order['next_row'] + j}: the "
                                       "sampler is not in file order")
            order["next_row"] += half
            micro_tokens.append(int(mask.sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_log.append({"step": state.global_step, "tokens": sum(micro_tokens),
                              "step_seconds": time.perf_counter() - clock["start"]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            # With logging_steps=1 the Trainer logs right after each optimizer step; the final summary log (train_loss,
            # train_runtime, ...) has no "loss" key and is skipped.
            if not logs or "loss" not in logs or "rewards/chosen" not in logs:
                return
            entry = steps_log[-1]
            if entry["step"] != state.global_step:
                raise RuntimeError(f"log for step {state.global_step} arrived after step {entry['step']}")
            entry.update({k: float(logs[k]) for k in LOGGED})
            entry["grad_norm"] = float(logs["grad_norm"])
            entry["learning_rate"] = float(logs["learning_rate"])

    with tempfile.TemporaryDirectory(prefix="dpo-trl-") as output_dir:
        args = DPOConfig(
            output_dir=output_dir,
            # the run: exactly `steps` optimizer steps of micro_batch x accumulation, data in file order
            max_steps=steps, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
            train_sampling_strategy="sequential", dataloader_drop_last=False, dataloader_num_workers=0,
            # the loss
            loss_type=[loss_type], beta=beta, label_smoothing=0.0, max_length=max_length,
            truncation_mode="keep_start", precompute_ref_log_probs=False, disable_dropout=True,
            # optimizer and schedule
            optim=OPTIM, learning_rate=lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM,
            # numerics and device: fp32, CPU, no activation recomputation
            # (activation_checkpointing is transformers 5's name; TRL's own default, gradient_checkpointing=True, is
            # its deprecated alias and yields to it)
            use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, seed=seed, data_seed=seed,
            # logging: every step, nothing saved or reported
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        )
        trainer = FileOrderDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                      processing_class=tokenizer, peft_config=peft_config, callbacks=[StepLog()])
        trainer.remove_callback(PrinterCallback)  # its rounded copy of every log line; main() prints its own
        if trainer.args.activation_checkpointing or trainer.args.bf16 or trainer.args.fp16:
            raise RuntimeError("TRL kept activation checkpointing or mixed precision on")
        if len(trainer.train_dataset) != needed:  # TRL drops rows whose prompt alone fills max_length
            raise ValueError(f"TRL kept {len(trainer.train_dataset)} of {needed} pairs: some prompts are at least "
                             f"max_length={max_length} tokens long")
        # TRL's own tokenization of every pair (its prepared dataset, before the collator's truncation), so the
        # other side's token ids can be compared with it pair for pair
        token_ids = [[row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]] for row in trainer.train_dataset]
        trainer.train()
        # What the Trainer actually built (the Accelerate wrapper holds the torch optimizer)
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        built = {"optimizer": f"{type(opt).__module__}.{type(opt).__name__}", "fused": opt.defaults.get("fused"),
                 "betas": list(opt.defaults["betas"]), "eps": opt.defaults["eps"],
                 "weight_decay": sorted({g["weight_decay"] for g in opt.param_groups}),
                 "trainable_params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
                 "reference": ("adapter 'ref' (copy of init_adapter)" if "ref" in getattr(model, "peft_config", {})
                               else "base model, adapter disabled" if lora is not None
                               else "separate copy loaded from model_dir")}

    if len(steps_log) != steps or any("loss" not in s for s in steps_log):
        raise RuntimeError(f"expected {steps} logged optimizer steps, got {len(steps_log)}")
    total_seconds = sum(s["step_seconds"] for s in steps_log)
    result = {
        "steps": steps_log,
        "peak_rss_mb": _peak_rss_mb(),
        "tokens_per_s": sum(s["tokens"] for s in steps_log) / total_seconds,
        "token_ids": token_ids,
        "trl_version": trl.__version__,
        "config": {"pairs": str(pairs_path), "model": str(model_dir), "loss_type": loss_type, "beta": beta,
                   "steps": steps, "micro_batch": micro_batch, "accumulation": accumulation, "lr": lr,
                   "max_length": max_length, "seed": seed, "lora": lora_desc, "optim": OPTIM,
                   "max_grad_norm": MAX_GRAD_NORM, "lr_scheduler": "constant", "dtype": "float32",
                   "pad_token_id": tokenizer.pad_token_id, "torch_threads": torch.get_num_threads(), **built},
    }
    Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="jsonl of {prompt, chosen, rejected} strings")
    p.add_argument("--model", required=True, help="model directory (weights + tokenizer)")
    p.add_argument("--out", required=True, help="result json to write")
    p.add_argument("--loss-type", default="sigmoid",
                   help="TRL DPOConfig.loss_type (sigmoid, ipo, hinge, robust, bco_pair, ...)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per forward/backward")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora", type=json.loads, default=None,
                   help='LoRA as json, e.g. \'{"r": 8, "alpha": 16, "init_adapter": "dir"}\' (omitted: full '
                        'fine-tuning)')
    p.add_argument("--max-length", type=int, default=512, help="max tokens of prompt+completion")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    result = run_trl(a.pairs, a.model, a.out, a.loss_type, a.beta, a.steps, a.micro_batch, a.accumulation, a.lr,
                     a.lora, a.max_length, a.seed)
    for s in result["steps"]:
        print(f"step {s['step']:3d}  loss {s['loss']:.6f}  margin {s['rewards/margins']:+.6f}  "
              f"acc {s['rewards/accuracies']:.2f}  {s['tokens']} tokens  {s['step_seconds']:.3f}s")
    print(f"trl {result['trl_version']}: {result['tokens_per_s']:.0f} tokens/s, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB -> {a.out}")


if __name__ == "__main__":
    main()
