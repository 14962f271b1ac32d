"""The TRL side of the GRPO speed benchmark (benchmarks/bench_grpo_speed.py): TRL 1.16's own GRPOTrainer sampling
with transformers' generate (no vLLM) on the CPU, set up as a careful user would for it, on the SAME prompts in the
same order as tuneforge (the text of tuneforge's prepared, chat-templated prompts, given as plain strings so that TRL
does not template them again), timed per optimizer step.

    python benchmarks/grpo_speed_trl_side.py --prompts WORK/prompts.json --model MODEL_DIR --out trl.json \\
        --steps 6 [--bf16]

(bench_grpo_speed.py runs this in a process of its own, with the repository on PYTHONPATH for the reward function
and TRL's directory before it where --trl-path says.)

What is trained
  model      MODEL_DIR (tuneforge's dequantized SmolLM2-135M-Instruct) loaded in fp32; LoRA through peft_config
             (r 16, alpha 32, dropout 0, "all-linear"); bf16 autocast (GRPOConfig bf16) where --bf16 says, which the
             benchmark passes where tuneforge's model.dtype auto picks bf16 (the CPU has bf16 matmuls).
  data       a Dataset of {"prompt": text, "answers": [...], "index": i}, prompts.json's order; shuffle_dataset
             False, so TRL's RepeatSampler walks it in order: step s generates for prompts 4s .. 4s+3, each 8 times.
  reward     tuneforge.eval.rewards.squad_f1_reward (TRL's signature: the SQuAD F1 of the completion's first line
             against the `answers` column), the one tuneforge's squad_f1 reward calls, so both sides score alike.
  config     GRPOConfig(use_cpu, bf16, per_device_train_batch_size 16, gradient_accumulation_steps 2 (one generation
             of 32 completions a step), num_generations 8, max_completion_length 24, temperature 0.7, top_p 1, top_k 0,
             beta 0, loss_type dapo, scale_rewards group, AdamW (TrainingArguments' default optim: adamw_torch_fused
             with this torch) lr 5e-4 constant, max_grad_norm 1.0, no activation checkpointing, seed 42).

Timing (all time.perf_counter, in this process)
  step        TrainerCallback on_step_begin .. on_step_end: the generation (in the first micro-batch's
              _prepare_inputs), rewards and advantages, both micro-batches' forward + backward, clipping and the
              optimizer step. (The data loader's fetch of the step's prompt rows happens just before on_step_begin.)
  generation  GRPOTrainer._generate_single_turn: padding the prompt ids and transformers' generate (sampling only,
              as tuneforge's generation_seconds).
  training    forward + backward of the step's micro-batches: the time in training_step less the time in
              _prepare_inputs inside it (as tuneforge's training_seconds, accumulate_policy).
  other       step - generation - training: tokenizing, decoding, rewards, advantages, clipping, optimizer.

Checks (a failed one stops the run): the prompt ids TRL tokenizes (processing_class(text=prompts), TRL's own call)
equal tuneforge's ids for every prompt (checked upfront for all of them, and at every generation for the rows it
gets); each generation's prompts are the expected 4, in order, each num_generations times; the trainer kept
activation checkpointing off and bf16 as asked; one generation per optimizer step.

Written to --out: per step its seconds (step, generation, training, other), the mean completion length (tokens,
eos included, as TRL and tuneforge count them), the mean reward, the prompt indices, and TRL's own logged reward and
completions/mean_length; the config as built; the tokenization check; the dtype the model computed in during
generation and during training (a forward hook on one adapted projection)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="bench_grpo_speed.py's prompts.json")
    ap.add_argument("--model", required=True, help="model directory (weights + tokenizer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GRPOConfig bf16=True)")
    ap.add_argument("--settings", required=True, help="json of the shared settings (bench_grpo_speed.SETTINGS)")
    a = ap.parse_args(argv)
    started = time.perf_counter()

    import torch
    import trl
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tuneforge.eval.rewards import squad_f1_reward

    disable_progress_bars()
    s = json.loads(a.settings)
    G, per_step = s["num_generations"], s["prompts_per_step"]
    prompts = json.loads(Path(a.prompts).read_text())["prompts"][:a.steps * per_step]
    if len(prompts) < a.steps * per_step:
        raise SystemExit(f"{a.prompts}: {len(prompts)} prompts, {a.steps * per_step} needed")
    by_index = {p["index"]: p for p in prompts}

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    # the call TRL makes on plain-string prompts (GRPOTrainer._tokenize_prompts): processing_class(text=prompts)
    got = tokenizer(text=[p["text"] for p in prompts])["input_ids"]
    differ = [p["index"] for p, ids in zip(prompts, got) if list(ids) != p["ids"]]
    token_check = {"prompts": len(prompts), "equal": not differ, "differing": differ[:20],
                   "bos_token": tokenizer.bos_token, "first_ids": [got[0][:6], prompts[0]["ids"][:6]],
                   "lengths": [min(len(x) for x in got), max(len(x) for x in got)]}
    print(f"[trl] tokenization check: {len(prompts)} prompts, TRL's ids "
          f"{'== tuneforge ids' if not differ else f'DIFFER for {len(differ)} (first {differ[:5]})'}; first ids "
          f"{got[0][:6]} (tuneforge {prompts[0]['ids'][:6]}), bos_token {tokenizer.bos_token!r}", flush=True)
    if differ:
        raise SystemExit("TRL's tokenization of the prompt text is not tuneforge's ids")

    cur: dict = {}
    steps: list[dict] = []
    logged: dict[int, dict] = {}
    dtypes: dict[str, str] = {}

    def reset():
        cur.clear()
        cur.update(generation=0.0, training_step=0.0, prepare_in_step=0.0, generations=0, lengths=[], rewards=[],
                   prompts=[], in_training_step=False)

    reset()

    def squad_f1(prompts, completions, **kwargs):  # named as tuneforge names it: rewards/squad_f1/mean
        values = squad_f1_reward(prompts, completions, **kwargs)
        cur["rewards"] += list(values)
        return values

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            if self.model.training:
                cur["prompts"] = [x["index"] for x in inputs][::G]
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if self.model.training:
                expected = [by_index[i]["ids"] for i in cur["prompts"] for _ in range(num_generations)]
                if [list(p) for p in prompt_ids] != expected or len(prompt_ids) != per_step * G:
                    raise RuntimeError(f"step {self.state.global_step + 1}: the prompt ids TRL generates for are not "
                                       f"tuneforge's ids of prompts {cur['prompts']} x {num_generations}")
            t0 = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                has_tool_images)
            cur["generation"] += time.perf_counter() - t0
            cur["generations"] += 1
            cur["lengths"] += [len(c) for c in out[0]]
            return out

        def _prepare_inputs(self, generation_batch):
            t0 = time.perf_counter()
            out = super()._prepare_inputs(generation_batch)
            if cur["in_training_step"]:
                cur["prepare_in_step"] += time.perf_counter() - t0
            return out

        def training_step(self, model, inputs, num_items_in_batch):
            cur["in_training_step"] = True
            t0 = time.perf_counter()
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                cur["training_step"] += time.perf_counter() - t0
                cur["in_training_step"] = False

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            reset()
            cur["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - cur["t0"]
            training = cur["training_step"] - cur["prepare_in_step"]
            steps.append({"step": state.global_step, "step_seconds": step_s, "generation_seconds": cur["generation"],
                          "training_seconds": training, "other_seconds": step_s - cur["generation"] - training,
                          "generations": cur["generations"], "completions": len(cur["lengths"]),
                          "completion_mean_length": statistics.mean(cur["lengths"]) if cur["lengths"] else None,
                          "completion_tokens": sum(cur["lengths"]),
                          "reward": statistics.mean(cur["rewards"]) if cur["rewards"] else None,
                          "prompts": cur["prompts"]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged[state.global_step] = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    lora = s["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"prompt": p["text"], "answers": p["answers"], "index": p["index"]}
                                 for p in prompts])
    with tempfile.TemporaryDirectory(prefix="grpo-speed-trl-") as output_dir:
        args = GRPOConfig(
            output_dir=output_dir, max_steps=a.steps, seed=s["seed"], data_seed=s["seed"],
            use_cpu=True, bf16=a.bf16, fp16=False, activation_checkpointing=False,
            per_device_train_batch_size=s["micro"], gradient_accumulation_steps=s["accumulation"],
            num_generations=G, max_completion_length=s["max_completion_length"],
            temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
            beta=s["beta"], loss_type=s["loss_type"], scale_rewards=s["scale_rewards"],
            learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=s["grad_clip"], shuffle_dataset=False, dataloader_num_workers=0,
            logging_steps=1, report_to=[], log_completions=False, save_strategy="no", disable_tqdm=True,
        )
        trainer = TimedGRPOTrainer(model=model, reward_funcs=[squad_f1], args=args, train_dataset=dataset,
                                   processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)
        t = trainer.args
        if t.activation_checkpointing or bool(t.bf16) != a.bf16 or t.fp16 or \
                t.generation_batch_size != per_step * G or t.steps_per_generation != s["accumulation"]:
            raise SystemExit(f"TRL changed the setup: activation_checkpointing {t.activation_checkpointing}, bf16 "
                             f"{t.bf16}, generation_batch_size {t.generation_batch_size}, steps_per_generation "
                             f"{t.steps_per_generation}")

        # which dtype the model computes in while generating and while training (one adapted projection's output)
        probe = next(m for n, m in trainer.model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))

        def hook(module, inputs, output):
            phase = "training" if cur["in_training_step"] and torch.is_grad_enabled() else "generation"
            dtypes.setdefault(phase, str(output.dtype).replace("torch.", ""))
            if len(dtypes) == 2:
                handle.remove()
        handle = probe.register_forward_hook(hook)

        print(f"[trl] trl {trl.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; bf16 "
              f"{t.bf16}; optim {t.optim}; eos ids {trainer.eos_token_ids}; {a.steps} steps ...", flush=True)
        setup_s = time.perf_counter() - started
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        built = {"optimizer": f"{type(opt).__module__}.{type(opt).__name__}", "fused": opt.defaults.get("fused"),
                 "optim": str(getattr(t.optim, "value", t.optim)), "lr": t.learning_rate,
                 "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
                 "trainable_params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
                 "bf16": t.bf16, "activation_checkpointing": t.activation_checkpointing,
                 "per_device_train_batch_size": t.per_device_train_batch_size,
                 "gradient_accumulation_steps": t.gradient_accumulation_steps,
                 "steps_per_generation": t.steps_per_generation, "generation_batch_size": t.generation_batch_size,
                 "num_generations": t.num_generations, "max_completion_length": t.max_completion_length,
                 "temperature": t.temperature, "top_p": t.top_p, "top_k": t.top_k, "beta": t.beta,
                 "loss_type": t.loss_type, "scale_rewards": t.scale_rewards, "max_grad_norm": t.max_grad_norm,
                 "eos_token_ids": list(trainer.eos_token_ids), "shuffle_dataset": t.shuffle_dataset,
                 "use_vllm": t.use_vllm, "model_dtype": str(next(trainer.model.parameters()).dtype)}
    if len(steps) != a.steps or any(r["generations"] != 1 for r in steps):
        raise SystemExit(f"expected {a.steps} steps of one generation each, got "
                         f"{[(r['step'], r['generations']) for r in steps]}")
    for r in steps:
        log = logged.get(r["step"], {})
        r["trl_logged"] = {k: log.get(k) for k in ("loss", "grad_norm", "reward", "completions/mean_length",
                                                   "step_time", "entropy")}
    result = {"side": "trl", "trl_version": trl.__version__, "torch_threads": torch.get_num_threads(),
              "config": built, "token_check": token_check, "steps": steps, "compute_dtype": dtypes,
              "setup_s": setup_s, "wall_s": time.perf_counter() - started,
              "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(a.out).write_text(json.dumps(result, indent=1))
    for r in steps:
        print(f"[trl] step {r['step']}: {r['step_seconds']:.2f} s (generation {r['generation_seconds']:.2f}, "
              f"training {r['training_seconds']:.2f}), mean length {r['completion_mean_length']:.1f}, reward "
              f"{r['reward']:.3f}, prompts {r['prompts']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
