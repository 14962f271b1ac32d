"""The TRL side of the GRPO parity benchmark (benchmarks/bench_grpo.py): TRL 1.16's own GRPOTrainer, fed the
completions bench_grpo.py generated once, configured to train exactly what the tuneforge side trains, so that the two
per-step curves can be compared number for number. Every configuration runs in this one process, one after another.

    pip install --no-deps trl==1.16.0     # the other side; tuneforge itself does not need it
    python benchmarks/grpo_trl_side.py --completions WORK/completions.json --model assets/models/stories260K \\
        --configs configs.json --out trl.json --settings '{"steps": 5, ...}'

`configs.json` is a list of {"loss_type", "beta", "num_iterations", "kl_ratio_correction"} (the last: the value of
use_bias_correction_kl here, and of rl.kl_ratio_correction on the tuneforge side); `--settings` holds the shared
numbers (steps, prompts_per_step, num_generations, micro, accumulation, lr, max_completion_length, temperature, epsilon,
seed, lora) as bench_grpo.py writes them.

What is trained (see bench_grpo.py's docstring for the whole comparison)
  model       the base model in fp32 + the adapter in completions.json's "adapter" (a PeftModel, trainable; with
              beta != 0 GRPOTrainer copies it into a frozen "ref" adapter, the reference).
  data        a Dataset of the prompts ("prompt": the text, "index": its position), shuffle_dataset=False: TRL's
              RepeatSampler walks the prompts in file order, each repeated num_generations times.
  generation  GRPOTrainer._generate_single_turn returns completions.json's completion ids for the n-th generation
              (logprobs None, as TRL's own transformers path), after checking that the prompt ids TRL tokenized are
              that generation's, each num_generations times, in order.
  micro-batches  trl.trainer.grpo_trainer.shuffle_sequence_dict (a torch.randperm over the generation batch's rows,
              before it is split into per-step micro-batches) is the identity here: micro-batch k = rows [8k, 8k+8),
              as on the tuneforge side (it matters for bnpo only).
  loss        TRL's loss_type, beta, epsilon (epsilon_high = epsilon), temperature, scale_rewards "group",
              importance_sampling_level "token", use_bias_correction_kl = the configuration's
              "kl_ratio_correction" (True, TRL's default: the k3 KL term multiplied by the ratio; False: the k3 term
              alone), no entropy bonus, no masking of truncated completions.
  optimizer   adamw_torch_fused, lr, betas (0.9, 0.999), eps 1e-8, weight decay 0, constant, no warmup, max_grad_norm
              1.0; fp32 on CPU (bf16/fp16 off), no activation checkpointing (TRL's default is on), dropout off.

Written to --out: per configuration the logged "loss", "grad_norm" (pre-clip), "reward", "kl", "entropy" and
"clip_ratio/region_mean" of every optimizer step (logging_steps 1), the prompt indices of every generation, the
advantages TRL computed and the completion texts its reward function received."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOGGED = ("loss", "grad_norm", "reward", "kl", "entropy", "clip_ratio/region_mean")


def run_config(c: dict, s: dict, fixed: dict, model_dir: str) -> dict:
    import torch
    from datasets import Dataset, disable_progress_bars
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.trainer_utils import set_seed

    import trl.trainer.grpo_trainer as grpo_module
    from trl import GRPOConfig, GRPOTrainer

    disable_progress_bars()
    set_seed(s["seed"])
    G, gens = s["num_generations"], fixed["generations"]
    target = int(s["reward"].split()[-1])
    trace = {"order": [], "advantages": [], "texts": [], "generation": 0}

    def length_reward(prompts, completions, **kwargs):
        trace["texts"].append(list(completions))
        return [max(0.0, 1.0 - abs(len(text) - target) / target) for text in completions]

    class FixedCompletionsGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                trace["order"][-1]["prompts"] = [x["index"] for x in inputs][::G]
                trace["advantages"].append(out["advantages"].tolist())
            return out

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            g = trace["generation"]
            want = gens[g]
            expected = [ids for ids in want["prompt_ids"] for _ in range(num_generations)]
            if [list(p) for p in prompt_ids] != expected:
                raise RuntimeError(f"generation {g}: TRL's prompt ids {prompt_ids} are not {expected}")
            trace["order"].append({"step": self.state.global_step, "generation": g})
            trace["generation"] += 1
            return [list(x) for x in want["completions"]], None

    original_shuffle = grpo_module.shuffle_sequence_dict
    grpo_module.shuffle_sequence_dict = lambda d: d  # micro-batch k = rows [8k, 8k+8), as tuneforge's

    steps_log: list[dict] = []

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or "grad_norm" not in logs:
                return
            steps_log.append({"step": state.global_step,
                              **{k: float(logs[k]) for k in LOGGED if logs.get(k) is not None}})

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, fixed["adapter"], is_trainable=True)
    lora = model.peft_config["default"]
    if (lora.r, float(lora.lora_alpha), float(lora.lora_dropout)) != (
            s["lora"]["r"], float(s["lora"]["alpha"]), float(s["lora"]["dropout"])):
        raise ValueError(f"{fixed['adapter']}: r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout}")
    dataset = Dataset.from_list([{"prompt": p["text"], "index": p["index"]} for p in fixed["prompts"]])
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="grpo-trl-") as output_dir:
            args = GRPOConfig(
                output_dir=output_dir,
                # the run: steps x (micro x accumulation) completions, the prompts in file order
                max_steps=s["steps"], per_device_train_batch_size=s["micro"],
                gradient_accumulation_steps=s["accumulation"], num_generations=G, shuffle_dataset=False,
                dataloader_num_workers=0,
                # generation (replaced by the fixed completions) and the loss
                max_completion_length=s["max_completion_length"], temperature=s["temperature"], top_p=1.0, top_k=0,
                beta=c["beta"], epsilon=s["epsilon"], epsilon_high=None, num_iterations=c["num_iterations"],
                loss_type=c["loss_type"], scale_rewards="group", importance_sampling_level="token",
                use_bias_correction_kl=bool(c["kl_ratio_correction"]), mask_truncated_completions=False,
                top_entropy_quantile=1.0, entropy_coef=0.0, disable_dropout=True, log_completions=False,
                # optimizer and schedule
                optim="adamw_torch_fused", learning_rate=s["lr"], adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                # fp32 on CPU, no activation recomputation
                use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, seed=s["seed"],
                data_seed=s["seed"],
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
            )
            trainer = FixedCompletionsGRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                                                  train_dataset=dataset, processing_class=tokenizer,
                                                  callbacks=[StepLog()])
            trainer.remove_callback(PrinterCallback)
            a = trainer.args
            if a.activation_checkpointing or a.bf16 or a.fp16 or a.steps_per_generation != s["accumulation"] or \
                    a.generation_batch_size != s["micro"] * s["accumulation"]:
                raise RuntimeError(f"TRL changed the setup: activation_checkpointing {a.activation_checkpointing}, "
                                   f"bf16 {a.bf16}, steps_per_generation {a.steps_per_generation}, "
                                   f"generation_batch_size {a.generation_batch_size}")
            if a.use_bias_correction_kl is not bool(c["kl_ratio_correction"]):
                raise RuntimeError(f"use_bias_correction_kl is {a.use_bias_correction_kl}, asked "
                                   f"{c['kl_ratio_correction']}")
            if c["beta"] and "ref" not in trainer.model.peft_config:
                raise RuntimeError("beta != 0 but GRPOTrainer made no 'ref' adapter: its reference would be the base")
            trainer.train()
            opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            built = {"optimizer": f"{type(opt).__module__}.{type(opt).__name__}", "fused": opt.defaults.get("fused"),
                     "trainable_params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
                     "reference": "adapter 'ref' (copy of the starting adapter)" if c["beta"] else "none (beta 0)",
                     "steps_per_generation": a.steps_per_generation, "generation_batch_size": a.generation_batch_size,
                     "use_bias_correction_kl": a.use_bias_correction_kl}
    finally:
        grpo_module.shuffle_sequence_dict = original_shuffle
    if len(steps_log) != s["steps"]:
        raise RuntimeError(f"expected {s['steps']} logged optimizer steps, got {len(steps_log)}")
    # the texts the reward function saw, one list per generation
    return {"config": c, "steps": steps_log, "order": trace["order"], "advantages": trace["advantages"],
            "texts": trace["texts"], "built": built, "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--completions", required=True, help="bench_grpo.py's completions.json")
    p.add_argument("--model", required=True, help="model directory (weights + tokenizer)")
    p.add_argument("--configs", required=True, help="json list of configurations")
    p.add_argument("--settings", required=True, help="json of the shared settings")
    p.add_argument("--out", required=True, help="result json to write")
    a = p.parse_args(argv)
    import torch
    import trl

    fixed = json.loads(Path(a.completions).read_text())
    settings = json.loads(a.settings)
    result = {"side": "trl", "trl_version": trl.__version__, "torch_threads": torch.get_num_threads(), "configs": {}}
    for c in json.loads(Path(a.configs).read_text()):
        name = f"{c['loss_type']}-beta{c['beta']:g}-it{c['num_iterations']}" + \
            ("" if c["kl_ratio_correction"] else "-nokl-corr")  # as bench_grpo.py's config_name
        r = run_config(c, settings, fixed, a.model)
        result["configs"][name] = r
        result["config"] = r["built"]
        print(f"[trl] {name}: " + ", ".join(f"{s['loss']:+.6f}/{s['grad_norm']:.6f}" for s in r["steps"]),
              flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
