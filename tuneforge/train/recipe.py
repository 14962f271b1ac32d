"""The supervised fine-tuning recipe: setup, train step, validate, checkpoint, finish. Reads top to bottom.

Loss of an optimizer step = (sum of token losses over all its micro-batches) / (label tokens in the whole step),
so micro-batch b x accumulation k gives the gradient of batch k*b exactly."""
from __future__ import annotations

import ctypes
import json
import logging
import math
import random
import resource
import time
from pathlib import Path

import torch

from tuneforge.checkpoint import load_checkpoint, load_sharded_checkpoint, save_checkpoint, save_sharded_checkpoint
from tuneforge.checkpoint.init_from import apply_init_from
from tuneforge.config import Config, to_dict
from tuneforge.data import build_eval_batches, build_train_loader, count_input_tokens, prepare_data
from tuneforge.data.loader import check_packing_backend
from tuneforge.data.report import data_summary_lines
from tuneforge.data.seq2seq import build_seq2seq_collator
from tuneforge.distributed import (DistEnv, all_reduce_sum, barrier, broadcast_object, check_strategy_fits, evaluating,
                                   init_distributed, inner_model, launched_world_size, needs_skeleton,
                                   resolve_strategy, set_gradient_sync, shutdown, wrap_model)
from tuneforge.errors import TrainingAborted, UserError
from tuneforge.eval.classify import validate_classifier
from tuneforge.eval.evaluate import build_training_squad
from tuneforge.models import (count_label_tokens, count_parameters, load_model, load_model_skeleton, load_tokenizer,
                              resolve_precision, store_frozen_linears)
from tuneforge.models.classify import build_classifier_config, check_classification_recipe, is_classifier
from tuneforge.models.gguf import resolve_model_source
from tuneforge.models.layers import decoder_layers
from tuneforge.models.load import resolve_kind
from tuneforge.peft import apply_finetuning, describe_finetuning
from tuneforge.peft.fit import check_checkpoint_fits
from tuneforge.preflight import check_checkpoint_room, check_model_config, check_output_dir, check_seq_length
from tuneforge.report import write_report
from tuneforge.run.dir import RunDirPlan, commit_run_dir, plan_run_dir
from tuneforge.train.export import consolidated_state, save_final
from tuneforge.train.metrics import MetricsSink, check_wandb
from tuneforge.train.optim import build_optimizer, build_scheduler
from tuneforge.train.signals import StopRequest

log = logging.getLogger("tuneforge")


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


@torch.no_grad()
def validate(module, batches, precision, env: DistEnv) -> dict:
    """Token-weighted mean loss over the whole validation set (all ranks' shares), and its perplexity. With
    several named sets ({name: batches}) also val_loss/<name> per set; val_loss is then over all their tokens."""
    if is_classifier(inner_model(module)):
        return validate_classifier(module, batches, precision, env)
    named = batches if isinstance(batches, dict) else {"": batches}
    sums = {}
    with evaluating(module):
        for name, set_batches in named.items():
            total, tokens = 0.0, 0
            for batch in set_batches:
                with precision.context():
                    total += float(module({k: v.to(env.device) for k, v in batch.items()}))
                tokens += count_label_tokens(batch)
            sums[name] = (all_reduce_sum(total, env), all_reduce_sum(tokens, env))
    loss = sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if len(named) > 1:
        out.update({f"val_loss/{name}": t / max(n, 1) for name, (t, n) in sums.items()})
    return out


def save_state(run_dir: Path, step: int, module, optimizer, scheduler, loader, cfg: Config, env: DistEnv) -> None:
    args = (run_dir / "checkpoints", step)
    if env.initialized:
        save_sharded_checkpoint(*args, module, optimizer, scheduler, loader, {"run": cfg.run.name},
                                cfg.checkpoint.keep_last, env)
    else:
        save_checkpoint(*args, inner_model(module), optimizer, scheduler, loader, {"run": cfg.run.name},
                        cfg.checkpoint.keep_last)


def load_state(ckpt: Path, module, optimizer, scheduler, loader, env: DistEnv) -> int:
    if env.initialized:
        return load_sharded_checkpoint(ckpt, module, optimizer, scheduler, loader, env)
    return load_checkpoint(ckpt, inner_model(module), optimizer, scheduler, loader)


def finetune(cfg: Config, overwrite: bool = False) -> Path:
    cfg = resolve_model_source(cfg)  # a GGUF file trains as its cached transformers directory (recorded as such)
    strategy = resolve_strategy(cfg.distributed, launched_world_size())
    check_strategy_fits(cfg, strategy, launched_world_size())
    env = init_distributed(strategy)
    try:
        return _finetune(cfg, overwrite, env, strategy)
    finally:
        shutdown(env)


def _finetune(cfg: Config, overwrite: bool, env: DistEnv, strategy: str) -> Path:
    # ---- setup ---------------------------------------------------------------------------------------------
    run_started = time.perf_counter()
    check_wandb(cfg)
    check_output_dir(cfg)
    check_seq_length(cfg, check_model_config(cfg))
    kind = resolve_kind(cfg.model)
    check_classification_recipe(cfg, kind)
    # Nothing in the run directory is written until every check below has passed (commit_run_dir).
    plan = plan_run_dir_on_main(cfg, overwrite, env)
    run_dir, resume_from = plan.run_dir, plan.resume_from
    if resume_from is not None and not env.initialized and kind != "sequence_classification":
        check_checkpoint_fits(cfg, resume_from)  # a changed model or peft section fails before the weights load
    seed_everything(cfg.run.seed)
    precision = resolve_precision(cfg.model.dtype, env.device.split(":")[0])
    if env.is_main:
        print(f"precision: {precision.describe()}", flush=True)
        if precision.emulated:
            log.warning("model.dtype=bfloat16 on hardware without bf16 matmuls: it works, but every matmul is "
                        "emulated and training is slower than in fp32; model.dtype=auto picks fp32 here")

    tokenizer = load_tokenizer(cfg.model)
    train, vals = prepare_data(cfg.data, tokenizer, cfg.run.seed, progress=cfg.logging.progress)

    if cfg.data.batching == "packing":
        check_packing_backend(cfg.model.attn_implementation, env.device)
    model_config = None
    if kind == "sequence_classification":  # the data's labels size the head; the tokenizer's pad id pools
        model_config = build_classifier_config(cfg.model, train.examples.names, tokenizer)
        if resume_from is not None and not env.initialized:
            check_checkpoint_fits(cfg, resume_from, model_config)
    model = (load_model_skeleton(cfg.model, model_config) if needs_skeleton(strategy, env)
             else load_model(cfg.model, config=model_config))
    model = apply_finetuning(model, cfg)  # adapters (peft) or partial freezing, QLoRA prep, activation checkpointing
    init_lines = apply_init_from(model, cfg) if cfg.model.init_from else []  # a resumed checkpoint then overrides
    model.train()
    trainable, total = count_parameters(model)
    finetuning_lines = describe_finetuning(model, cfg)  # before sharding replaces the parameters
    check_checkpoint_room(run_dir, trainable, cfg)
    if cfg.peft is not None and cfg.model.frozen_dtype == "auto" and precision.autocast and strategy != "fsdp2":
        store_frozen_linears(model, precision.autocast)  # FSDP2 shards a layer's parameters in one dtype
    if cfg.train.compile:
        compile_layers(model)
    module = wrap_model(model, strategy, cfg.distributed, env, precision.autocast or torch.float32,
                        cfg.train.loss_chunk_tokens, cfg.train.head_on_labels_only)

    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
    collate = build_seq2seq_collator(model, tokenizer, cfg.data.batching, cfg.data.seq_length)  # None: causal LM
    loader = build_train_loader(train.examples, t.micro_batch_size, tokenizer.pad_token_id, cfg.run.seed,
                                env.rank, env.world_size, cfg.data.batching, cfg.data.seq_length,
                                sizes=train.bounds_sizes, weights=train.weights, shuffle=cfg.data.shuffle,
                                num_workers=cfg.data.num_workers, collate_fn=collate)
    per_epoch = loader.batch_sampler.per_rank / accum
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * per_epoch))
    val_batches = {name: build_eval_batches(val.examples, t.micro_batch_size, tokenizer.pad_token_id,
                                            env.rank, env.world_size, cfg.data.batching, cfg.data.seq_length,
                                            collate_fn=collate)
                   for name, val in vals.items()}
    optimizer = build_optimizer(module, t.optimizer)  # after wrapping: FSDP2 replaces parameters by shards
    scheduler = build_scheduler(optimizer, t.lr_scheduler, total_steps)

    start_step = 0
    if resume_from is not None:
        start_step = load_state(resume_from, module, optimizer, scheduler, loader, env)
    if start_step >= total_steps and (run_dir / "final").exists():  # a finished run's record stays as it is
        if env.is_main:
            print(f"run {run_dir} already finished ({start_step} of {total_steps} steps); nothing to do. Raise "
                  "train.max_steps to train it further, or pass --overwrite to start it again", flush=True)
        del module, optimizer
        return run_dir
    if env.is_main:
        commit_run_dir(plan, cfg)
    barrier(env)  # the other ranks write checkpoint shards into the directory rank 0 just made
    sink = MetricsSink(run_dir, cfg, total_steps, start_step, to_dict(cfg)) if env.is_main else None
    info = sink.info if sink else (lambda message: None)
    info(f"model {cfg.model.name_or_path}: {trainable:,} trainable / {total:,} parameters "
         f"({100 * trainable / total:.2f}%), {precision.name} on {env.device}")
    for line in finetuning_lines + init_lines:
        info(line)
    if plan.changed:
        info(f"resuming with changed settings (they do not change what a step computes): {'; '.join(plan.changed)}")
    for line in data_summary_lines(train, vals, loader.batch_sampler, cfg.data):
        info(line)
    info(f"batch: {t.global_batch_size} = micro {t.micro_batch_size} x accumulation {accum} x "
         f"{env.world_size} process(es) [{strategy}]; {total_steps} steps ({per_epoch:.1f} per epoch)"
         + (f"; resuming after step {start_step} from {resume_from}" if resume_from else ""))

    squad = build_training_squad(cfg, tokenizer, model, precision, env)  # the ranks share the questions
    if start_step == 0:
        baseline = validate(module, val_batches, precision, env) if val_batches else {}  # what the run improves on
        baseline.update(squad.at(0, total_steps, module) if squad else {})
        if baseline and sink:
            sink.log(0, baseline)

    # ---- train ---------------------------------------------------------------------------------------------
    params = [p for p in module.parameters() if p.requires_grad]
    batches = iter(loader)
    stop = StopRequest().install()
    try:  # a run that fails (or is interrupted twice) gives the process its signal handlers back
        last_step = min(total_steps, t.stop_at_step or total_steps)
        step, bad_steps, skipped = start_step, 0, 0
        release_every = t.release_memory_every_steps if env.device == "cpu" else None
        while step < last_step:
            step += 1
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(accum)]
            # The step's loss is divided by its label tokens over all micro-batches and ranks; DDP and FSDP average
            # gradients over ranks, so each rank's share is scaled back up by the world size.
            step_tokens = all_reduce_sum(sum(count_label_tokens(mb) for mb in micro_batches), env)
            scale = env.world_size / max(step_tokens, 1)
            loss_sum = 0.0
            for i, mb in enumerate(micro_batches):
                with set_gradient_sync(module, i == accum - 1):
                    with precision.context():
                        loss = module({k: v.to(env.device) for k, v in mb.items()})
                    (loss * scale).backward()
                loss_sum += loss.detach()
            grad_norm = clip_grad_norm(params, t.grad_clip)
            lr = scheduler.get_last_lr()[0]
            step_loss = all_reduce_sum(float(loss_sum), env) / max(step_tokens, 1)
            healthy = math.isfinite(step_loss) and math.isfinite(float(grad_norm))
            if healthy:
                optimizer.step()
                bad_steps = 0
            else:  # skip the update: the weights (and so every checkpoint) stay finite
                bad_steps += 1
                skipped += 1
                info(f"step {step}: non-finite loss or gradient ({step_loss}, norm {float(grad_norm)}); step skipped "
                     f"({bad_steps} in a row, limit train.max_bad_steps={t.max_bad_steps})")
                if bad_steps >= t.max_bad_steps:
                    raise TrainingAborted(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last: step {step}); lower "
                        "train.optimizer.lr, set train.grad_clip, or check the data. The newest checkpoint holds the "
                        "last finite weights.")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if release_every and step % release_every == 0:
                release_freed_memory()

            metrics = {}
            if step % t.log_every_steps == 0 or step == total_steps or not healthy:
                seconds = time.perf_counter() - started
                real_tokens = all_reduce_sum(sum(count_input_tokens(mb) for mb in micro_batches), env)
                metrics = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                           "tokens": int(real_tokens), "tokens_per_s": real_tokens / seconds,
                           "label_tokens": int(step_tokens),
                           "epoch": step / per_epoch, "step_seconds": seconds, "peak_rss_mb": _peak_rss_mb(),
                           **({"skipped_steps": skipped} if skipped else {})}
            if val_batches and ((t.val_every_steps and step % t.val_every_steps == 0) or step == total_steps):
                metrics.update(validate(module, val_batches, precision, env))
            if squad is not None:
                metrics.update(squad.at(step, total_steps, module))
            if metrics and sink:
                sink.log(step, metrics)
            if all_reduce_sum(stop.requested, env):  # every rank stops at the same step boundary
                last_step = step
                info(f"{stop.signal_name or 'a signal on another rank'}: checkpointing at step {step} and exiting; "
                     "run the same command again to continue")
                break
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < last_step:
                save_state(run_dir, step, module, optimizer, scheduler, loader, cfg, env)

        # ---- finish --------------------------------------------------------------------------------------------
        stopped_early = last_step < total_steps
        if (cfg.checkpoint.every_steps or stopped_early) and last_step > start_step:
            save_state(run_dir, last_step, module, optimizer, scheduler, loader, cfg, env)
    finally:
        stop.uninstall()
    if stopped_early:
        info(f"stopped after step {last_step} of {total_steps}; run the same command again to continue")
    else:
        # FSDP2 holds shards: gather them to rank 0; DDP and single-process models hold whole weights already.
        state = consolidated_state(module, env, trainable_only=cfg.peft is not None) if strategy == "fsdp2" else None
        if env.is_main:
            save_final(inner_model(module), tokenizer, cfg, run_dir / "final", state)
            info(summarize(run_dir / "metrics.jsonl", time.perf_counter() - run_started))
    if sink:
        sink.close()
        if not stopped_early:
            sink.info(f"report: {write_report(run_dir)}")
    del module, optimizer  # a DDP module must go before the process group does
    return run_dir


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
    parts = [f"{len(train)} logged steps in {seconds:.0f}s"]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
        parts.append(f"train loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} (first/last 10%)")
    if val:
        parts.append(f"val loss {val[0]:.3f} -> {val[-1]:.3f}")
    squad = [(r["step"], r["squad_em"], r["squad_f1"]) for r in rows if "squad_f1" in r]
    if squad:  # a score at step 0 is the base model's
        (s0, em0, f0), (s1, em1, f1) = squad[0], squad[-1]
        parts.append(f"squad EM/F1 {em0:.1f}/{f0:.1f} (step {s0}) -> {em1:.1f}/{f1:.1f} (step {s1})")
    return "done: " + "; ".join(parts) + f"; output in {metrics_path.parent / 'final'}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
