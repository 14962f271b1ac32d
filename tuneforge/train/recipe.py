"""The fine-tuning recipe: setup -> train_step -> train -> finish. Reads top to bottom, the same for every objective.

What a run trains its model to do is its objective (train/objective.py): its data, batches, step and held-out
metrics. SFT's step loss = (sum of token losses over all its micro-batches and ranks) / (label tokens in that whole
step), so micro-batch b x accumulation k x ranks r gives the gradient of one batch of k*b*r exactly; a preference
run divides by the pairs of the whole step (train/preference.py)."""
from __future__ import annotations

import ctypes
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneforge.checkpoint import check_checkpoint_fits, load_checkpoint, save_checkpoint
from tuneforge.checkpoint.init_from import apply_init_from
from tuneforge.checkpoint.state import TrainState
from tuneforge.config import Config, to_dict
from tuneforge.data import build_train_loader
from tuneforge.data.loader import check_packing_backend
from tuneforge.distributed import (DistEnv, all_reduce_sum, barrier, broadcast_object, init_distributed, inner_model,
                                   launched_world_size, needs_skeleton, shutdown, wrap_model)
from tuneforge.errors import TrainingAborted, UserError
from tuneforge.eval.evaluate import build_training_squad
from tuneforge.models.attention import (attention_name, use_block_mask_attention, use_model_attention,
                                        use_per_example_attention)
from tuneforge.models.classify import build_classifier_config
from tuneforge.models.gguf import resolve_model_source
from tuneforge.models.head import check_split_head, set_split_verdict
from tuneforge.models.layers import decoder_layers, transformers_model
from tuneforge.models.load import (Precision, check_tokenizer_fits, count_parameters, load_model, load_model_skeleton,
                                   load_tokenizer, resolve_precision, store_frozen_linears)
from tuneforge.models.packing import PackedAttention, choose_packed_attention
from tuneforge.peft import apply_finetuning, describe_finetuning
from tuneforge.preflight import Preflight, check_checkpoint_room, preflight
from tuneforge.report import write_report
from tuneforge.run.dir import RunDirPlan, commit_run_dir, plan_run_dir
from tuneforge.train.final import consolidated_state, save_final
from tuneforge.train.metrics import MetricsSink, step_row
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.objective import Objective
from tuneforge.train.grpo import GRPOObjective
from tuneforge.train.preference import PreferenceObjective
from tuneforge.train.signals import StopRequest

log = logging.getLogger("tuneforge")

# The objectives a recipe selects by a section of its own (train/objective.py); supervised fine-tuning where none is
# set. A new objective is its module and one entry here.
OBJECTIVES = {"preference": PreferenceObjective, "rl": GRPOObjective}


def build_objective(cfg: Config) -> Objective:
    """The recipe's objective: the one whose section it sets, else SFT."""
    return next((cls(cfg) for section, cls in OBJECTIVES.items() if getattr(cfg, section, None) is not None),
                Objective(cfg))


@dataclass
class Training:
    """Everything setup builds and train / finish use. `state` is what a checkpoint saves and restores."""
    cfg: Config
    env: DistEnv
    strategy: str
    run_dir: Path
    precision: Precision
    tokenizer: object
    state: TrainState
    accum: int                     # micro-batches per optimizer step on each rank
    total_steps: int
    per_epoch: float               # optimizer steps per pass over the training data
    val_batches: dict              # {set name: batches}; empty without validation data
    squad: object | None           # SQuAD EM/F1 by generation during training (eval.squad), or None
    sink: MetricsSink | None       # rank 0 writes metrics.jsonl, TensorBoard, W&B; None elsewhere
    started: float                 # perf_counter at the start of the run
    start_step: int = 0            # the step a resumed run continues after
    params: list = field(default_factory=list)  # the trainable parameters (gradient clipping)
    objective: Objective | None = None  # what the run trains the model to do (train/objective.py)

    def validate(self) -> dict:
        """The objective's held-out metrics (SFT: validation loss; preference: loss and rewards of held-out pairs)."""
        return self.objective.validate(self.state.module, self.val_batches, self.precision, self.env)

    def info(self, message: str) -> None:
        if self.sink:
            self.sink.info(message)

    @property
    def finished(self) -> bool:
        return self.start_step >= self.total_steps and (self.run_dir / "final").exists()


def finetune(cfg: Config, overwrite: bool = False) -> Path:
    cfg = resolve_model_source(cfg)  # a GGUF file trains as its cached transformers directory (recorded as such)
    facts = preflight(cfg, launched_world_size())  # the checks that need config.json, the disk or the process count
    env = init_distributed(facts.strategy)
    training = None
    try:
        training = setup(cfg, overwrite, env, facts)
        if training.finished:  # a finished run's record stays as it is
            if env.is_main:
                print(f"run {training.run_dir} already finished ({training.start_step} of {training.total_steps} "
                      "steps); nothing to do. Raise train.max_steps to train it further, or pass --overwrite to "
                      "start it again", flush=True)
            return training.run_dir
        finish(training, train(training))
        return training.run_dir
    finally:
        training = None  # a DDP module must go before the process group does
        shutdown(env)


# ---- setup ---------------------------------------------------------------------------------------------------
def setup(cfg: Config, overwrite: bool, env: DistEnv, facts: Preflight) -> Training:
    """Data, model, fine-tuning, wrapping, optimizer, resume, the run directory and the baseline scores, for a recipe
    the pre-flight accepted. Nothing in the run directory is written until every check that can fail on bad input
    has passed (commit_run_dir)."""
    run_started = time.perf_counter()
    strategy, kind = facts.strategy, facts.kind
    plan = plan_run_dir_on_main(cfg, overwrite, env)
    resume_from = plan.resume_from
    if resume_from is not None and not env.initialized and kind != "sequence_classification":
        check_checkpoint_fits(cfg, resume_from)  # a changed model or peft section fails before the weights load
    seed_everything(cfg.run.seed)
    precision = resolve_precision(cfg.model.dtype, env.device.split(":")[0])
    if env.is_main:
        print(f"precision: {precision.describe()}", flush=True)
        if precision.emulated:
            log.warning("model.dtype=bfloat16 on hardware without bf16 matmuls: it works, but every matmul is "
                        "emulated and training is slower than in fp32; model.dtype=auto picks fp32 here")

    objective = build_objective(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_data, vals = objective.prepare_data(tokenizer)
    if cfg.data.batching == "packing":
        check_packing_backend(cfg.model.attn_implementation, env.device)
    model_config = None
    if kind == "sequence_classification":  # the data's labels size the head; the tokenizer's pad id pools
        model_config = build_classifier_config(cfg.model, train_data.examples.names, tokenizer)
        if resume_from is not None and not env.initialized:
            check_checkpoint_fits(cfg, resume_from, model_config)
    model = (load_model_skeleton(cfg.model, model_config) if needs_skeleton(strategy, env)
             else load_model(cfg.model, config=model_config))
    check_tokenizer_fits(tokenizer, model, cfg.model.name_or_path)
    # compiled layers keep sdpa inside their one graph: the per-example path's graph break gave inductor graphs whose
    # q/k/v outputs held NaNs with ATEN_CPU_CAPABILITY=avx2 (benchmarks/RESULTS.md)
    per_example = (cfg.data.batching == "packing" and cfg.model.packed_attention == "per_example"
                   and not cfg.train.compile and use_per_example_attention(model))
    model = apply_finetuning(model, cfg)  # adapters (peft) or partial freezing, QLoRA prep, activation checkpointing
    path_lines, per_example = check_fast_paths(model, cfg, env, kind, per_example, tokenizer.pad_token_id)
    path_lines.insert(0, attention_line(model, facts, per_example))
    init_lines = apply_init_from(model, cfg) if cfg.model.init_from else []  # a resumed checkpoint then overrides
    path_lines += objective.prepare_model(model, strategy, env)  # e.g. online RL's reference copy, its checks
    model.train()
    trainable, total = count_parameters(model)
    finetuning_lines = describe_finetuning(model, cfg)  # before sharding replaces the parameters
    check_checkpoint_room(plan.run_dir, trainable, cfg)
    if cfg.peft is not None and cfg.model.frozen_dtype == "auto" and precision.autocast and strategy != "fsdp2":
        store_frozen_linears(model, precision.autocast)  # FSDP2 shards a layer's parameters in one dtype
    if cfg.train.compile:
        compile_layers(model)
    module = wrap_model(model, strategy, cfg.distributed, env, precision.autocast or torch.float32,
                        cfg.train.loss_chunk_tokens, cfg.train.head_on_labels_only)

    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
    collate = objective.collator(tokenizer, model.config)  # or None: the loader's own
    loader = build_train_loader(train_data.examples, objective.loader_batch_size(env.world_size),
                                tokenizer.pad_token_id, cfg.run.seed, env.rank, env.world_size, cfg.data.batching,
                                objective.row_tokens(train_data),
                                sizes=train_data.bounds_sizes, weights=train_data.weights, shuffle=cfg.data.shuffle,
                                num_workers=cfg.data.num_workers, collate_fn=collate)
    per_epoch = objective.steps_per_epoch(loader.batch_sampler.per_rank, accum)
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * per_epoch))
    val_batches = objective.eval_batches(vals, tokenizer, env, collate)
    optimizer = build_optimizer(module, t.optimizer)  # after wrapping: FSDP2 replaces parameters by shards
    state = TrainState(module, optimizer, build_scheduler(optimizer, t.lr_scheduler, total_steps), loader,
                       objective=objective if objective.has_state else None)
    if resume_from is not None:
        load_checkpoint(resume_from, state, env)
    training = Training(cfg, env, strategy, plan.run_dir, precision, tokenizer, state, accum, total_steps, per_epoch,
                        val_batches, squad=None, sink=None, started=run_started, start_step=state.step,
                        objective=objective)
    if training.finished:
        return training
    if env.is_main:
        commit_run_dir(plan, cfg)
    barrier(env)  # the other ranks write checkpoint shards into the directory rank 0 just made
    if env.is_main:
        training.sink = MetricsSink(plan.run_dir, cfg, total_steps, state.step, to_dict(cfg))
    info = training.info
    info(f"model {cfg.model.name_or_path}: {trainable:,} trainable / {total:,} parameters "
         f"({100 * trainable / total:.2f}%), {precision.name} on {env.device}")
    for line in path_lines + finetuning_lines + init_lines:
        info(line)
    if plan.changed:
        info(f"resuming with changed settings (they do not change what a step computes): {'; '.join(plan.changed)}")
    for line in objective.summary_lines(train_data, vals, loader.batch_sampler):
        info(line)
    info(f"batch: {t.global_batch_size} = micro {t.micro_batch_size} x accumulation {accum} x "
         f"{env.world_size} process(es) [{strategy}]; {total_steps} steps ({per_epoch:.1f} per epoch)"
         + (f"; resuming after step {state.step} from {resume_from}" if resume_from else ""))

    objective.start(training, train_data, vals)  # e.g. a preference run's reference
    training.squad = build_training_squad(cfg, tokenizer, model, precision, env)  # the ranks share the questions
    if state.step == 0:
        baseline = training.validate() if val_batches else {}  # what the run improves on
        baseline.update(training.squad.at(0, total_steps, module) if training.squad else {})
        if baseline and training.sink:
            training.sink.log(0, baseline)
    training.params = [p for p in module.parameters() if p.requires_grad]  # after the baseline: FSDP2 resharded
    return training


def attention_line(model, facts: Preflight, per_example: bool) -> str:
    """Which attention the model runs and why (model.attn_implementation, auto resolved for the architecture)."""
    reason = facts.attention.reason if facts.attention is not None else "model.attn_implementation"
    return f"attention: {attention_name(model)} ({reason})" + ("; per example in packed rows" if per_example else "")


def check_fast_paths(model, cfg: Config, env: DistEnv, kind: str, per_example: bool,
                     pad_id: int) -> tuple[list[str], bool]:
    """Where tuneforge's faster paths are not exact for this model, its own forward: the LM head on the labelled
    positions only (models/head.py), and for packed rows the fastest attention path that keeps the examples apart
    (models/packing.py), each checked by a short fp32 forward of the model before wrapping. Rank 0 checks (it holds
    the weights under FSDP2) and every rank goes by its answer. Packing that no attention makes exact is refused,
    before the run directory is written. Returns the lines for the log and whether per-example attention stays on."""
    if kind != "causal_lm":
        return [], per_example
    verdicts = None
    if env.is_main:
        head = check_split_head(model) if cfg.train.head_on_labels_only else None
        packed = (choose_packed_attention(model, per_example, pad_id) if cfg.data.batching == "packing"
                  else PackedAttention("per_example" if per_example else "model"))
        verdicts = (head, packed)
    head, packed = broadcast_object(verdicts, env)
    if cfg.train.head_on_labels_only:
        set_split_verdict(model, head)
    if not env.is_main and packed.path != "per_example":  # rank 0's model was switched by the check itself
        use_model_attention(model)
        if packed.path == "block_mask":
            use_block_mask_attention(model)
    if packed.not_exact:
        raise UserError(f"data.batching: packing is not exact for {type(transformers_model(model)).__name__}: "
                        f"{packed.not_exact}; use data.batching: pad_longest or group_by_length")
    lines = []
    if head:
        lines.append(f"loss: the model's full forward, not the LM head on labelled positions only ({head})")
    if packed.dropped:
        lines.append(f"packed rows: {PACKED_PATHS[packed.path]} ({'; '.join(packed.dropped)})")
    return lines, packed.path == "per_example"


PACKED_PATHS = {"model": "transformers' attention with its packed-sequence mask",
                "block_mask": "the model's own attention under a block mask from the position_ids"}


def plan_run_dir_on_main(cfg: Config, overwrite: bool, env: DistEnv) -> RunDirPlan:
    """Rank 0 decides (reading only); the others learn the outcome, including an error, so none waits forever."""
    outcome = None
    if env.is_main:
        try:
            outcome = ("ok", plan_run_dir(cfg, overwrite))
        except UserError as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome, env)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- train_step ----------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float          # the step's mean loss per what the objective counts (label tokens, pairs), over all ranks
    grad_norm: float     # before clipping
    label_tokens: int    # over all micro-batches and ranks: what the loss was divided by (objective.counts)
    healthy: bool        # loss and gradient finite: the optimizer stepped
    metrics: dict = field(default_factory=dict)  # the objective's own (preference: rewards/*, logps/*)


def train_step(state: TrainState, micro_batches: list[dict], precision: Precision, env: DistEnv, params: list,
               grad_clip: float | None, objective: Objective | None = None) -> StepResult:
    """One optimizer step of the objective (SFT where none is given). A step whose loss or gradient is not finite
    changes no weight (the NaN guard): every checkpoint then holds finite weights; the schedule still advances, so a
    skipped step is a step."""
    loss, tokens, metrics = (objective or Objective(None)).step(state.module, micro_batches, precision, env)
    grad_norm = float(clip_grad_norm(params, grad_clip))
    healthy = math.isfinite(loss) and math.isfinite(grad_norm)
    if healthy:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(loss, grad_norm, tokens, healthy, metrics)


# ---- train ---------------------------------------------------------------------------------------------------
def train(training: Training) -> int:
    """The loop: steps, metrics, validation and SQuAD on their cadence, checkpoints, a clean stop on SIGTERM /
    SIGUSR1 / Ctrl-C at a step boundary (every rank at the same one). Returns the last step trained."""
    cfg, env, state, t = training.cfg, training.env, training.state, training.cfg.train
    info, total_steps = training.info, training.total_steps
    batches = iter(state.loader)
    stop = StopRequest().install()
    try:  # a run that fails (or is interrupted twice) gives the process its signal handlers back
        last_step = min(total_steps, t.stop_at_step or total_steps)
        bad_steps, skipped = 0, 0
        release_every = t.release_memory_every_steps if env.device == "cpu" else None
        while state.step < last_step:
            started = time.perf_counter()
            micro_batches = training.objective.draw(batches, training.accum, state.step)
            lr = state.scheduler.get_last_lr()[0]
            result = train_step(state, micro_batches, training.precision, env, training.params, t.grad_clip,
                                training.objective)
            step = state.step
            if result.healthy:
                bad_steps = 0
            else:
                bad_steps += 1
                skipped += 1
                info(f"step {step}: non-finite loss or gradient ({result.loss}, norm {result.grad_norm}); step "
                     f"skipped ({bad_steps} in a row, limit train.max_bad_steps={t.max_bad_steps})")
                if bad_steps >= t.max_bad_steps:
                    raise TrainingAborted(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last: step {step}); lower "
                        "train.optimizer.lr, set train.grad_clip, or check the data. The newest checkpoint holds the "
                        "last finite weights.")
            if release_every and step % release_every == 0:
                release_freed_memory()

            metrics = {}
            if step % t.log_every_steps == 0 or step == total_steps or not result.healthy:
                real_tokens = training.objective.input_tokens(micro_batches, env)
                metrics = step_row(result, lr, real_tokens, time.perf_counter() - started,
                                   training.objective.counts, step / training.per_epoch, skipped)
            if training.val_batches and ((t.val_every_steps and step % t.val_every_steps == 0) or step == total_steps):
                metrics.update(training.validate())
            if training.squad is not None:
                metrics.update(training.squad.at(step, total_steps, state.module))
            if metrics and training.sink:
                training.sink.log(step, metrics)
            if all_reduce_sum(stop.requested, env):  # every rank stops at the same step boundary
                last_step = step
                info(f"{stop.signal_name or 'a signal on another rank'}: checkpointing at step {step} and exiting; "
                     "run the same command again to continue")
                break
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < last_step:
                save_training_state(training)
        # the last checkpoint, still under the signal handlers: a second signal cannot cut it in half
        if (cfg.checkpoint.every_steps or last_step < total_steps) and last_step > training.start_step:
            save_training_state(training)
    finally:
        stop.uninstall()
    return last_step


def save_training_state(training: Training) -> None:
    save_checkpoint(training.run_dir / "checkpoints", training.state, {"run": training.cfg.run.name},
                    training.cfg.checkpoint.keep_last, training.env)


# ---- finish --------------------------------------------------------------------------------------------------
def finish(training: Training, last_step: int) -> None:
    """The HF-native final/ output, the summary line and report.html; or, for a run stopped early, how to go on."""
    cfg, env, info = training.cfg, training.env, training.info
    stopped_early = last_step < training.total_steps
    if stopped_early:
        info(f"stopped after step {last_step} of {training.total_steps}; run the same command again to continue")
    else:
        module = training.state.module
        # FSDP2 holds shards: gather them to rank 0; DDP and single-process models hold whole weights already.
        state = (consolidated_state(module, env, trainable_only=cfg.peft is not None)
                 if training.strategy == "fsdp2" else None)
        if env.is_main:
            save_final(inner_model(module), training.tokenizer, cfg, training.run_dir / "final", state)
            info(summarize(training.run_dir / "metrics.jsonl", time.perf_counter() - training.started))
    if training.sink:
        training.sink.close()
        if not stopped_early:
            training.sink.info(f"report: {write_report(training.run_dir)}")


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim). A CPU training step frees and reallocates
    gigabytes of activations; glibc keeps what was freed, and the resident size creeps up step after step."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (parameter names unchanged): every layer shares one compiled graph,
    so compiling takes seconds, not the minutes of a whole-model graph, and checkpoints stay loadable."""
    for layer in decoder_layers(model):
        layer.compile()


def clip_grad_norm(params, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm (clipped to max_norm when set); FSDP2 shards come back as a DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def summarize(metrics_path: Path, seconds: float) -> str:
    """One line for the end of a run: how the losses moved and where the output is."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    accuracy = [r["val_rewards/accuracies"] for r in rows if "val_rewards/accuracies" in r]
    parts = [f"{len(train)} logged steps in {seconds:.0f}s"]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
        parts.append(f"train loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} (first/last 10%)")
    if val:
        parts.append(f"val loss {val[0]:.3f} -> {val[-1]:.3f}")
    likelier = [r["val_logps/accuracies"] for r in rows if "val_logps/accuracies" in r]
    if accuracy:
        parts.append(f"held-out rewards/accuracies {accuracy[0]:.3f} -> {accuracy[-1]:.3f}, chosen likelier "
                     f"{likelier[0]:.3f} -> {likelier[-1]:.3f}")
    reward = [r["reward"] for r in rows if "reward" in r]
    if reward:  # online RL: the loss is ~0 by construction; the reward is what moves
        head, tail = reward[: max(1, len(reward) // 10)], reward[-max(1, len(reward) // 10):]
        parts.append(f"reward {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} (first/last 10%)")
    val_reward = [r["val_reward"] for r in rows if "val_reward" in r]
    if val_reward:
        parts.append(f"held-out greedy reward {val_reward[0]:.3f} -> {val_reward[-1]:.3f}")
    squad = [(r["step"], r["squad_em"], r["squad_f1"]) for r in rows if "squad_f1" in r]
    if squad:  # a score at step 0 is the base model's
        (s0, em0, f0), (s1, em1, f1) = squad[0], squad[-1]
        parts.append(f"squad EM/F1 {em0:.1f}/{f0:.1f} (step {s0}) -> {em1:.1f}/{f1:.1f} (step {s1})")
    return "done: " + "; ".join(parts) + f"; output in {metrics_path.parent / 'final'}"
