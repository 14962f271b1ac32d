"""The supervised fine-tuning recipe: setup, train step, validate, checkpoint, finish. Reads top to bottom.

Loss of an optimizer step = (sum of token losses over all its micro-batches) / (label tokens in the whole step),
so micro-batch b x accumulation k gives the gradient of batch k*b exactly."""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import shutil
import time
from pathlib import Path

import torch

from tuneforge.checkpoint import find_latest, load_checkpoint, save_checkpoint
from tuneforge.config import Config, dump_config, to_dict
from tuneforge.data import build_eval_batches, build_train_loader, prepare_source
from tuneforge.distributed import DistEnv, detect_env
from tuneforge.errors import UserError
from tuneforge.eval.evaluate import build_training_squad
from tuneforge.models import (causal_lm_loss, count_label_tokens, count_parameters, load_model, load_tokenizer,
                              resolve_precision)
from tuneforge.peft import adapter_summary, apply_peft
from tuneforge.report import write_report
from tuneforge.train.export import save_final
from tuneforge.train.metrics import MetricsSink, check_wandb
from tuneforge.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("tuneforge")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def prepare_run_dir(cfg: Config, overwrite: bool) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from. An existing run is never silently replaced."""
    run_dir = run_dir_of(cfg)
    ckpt = None
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        if cfg.checkpoint.resume == "auto":
            ckpt = find_latest(run_dir / "checkpoints")
        if ckpt is None and cfg.checkpoint.resume not in ("auto", "never"):
            ckpt = Path(cfg.checkpoint.resume)
        if ckpt is None and any((run_dir / f).exists() for f in ("metrics.jsonl", "final", "checkpoints")):
            raise UserError(f"run directory {run_dir} already holds a run with nothing to resume; "
                            "pass --overwrite to replace it or choose another run.name")
    elif cfg.checkpoint.resume not in ("auto", "never"):
        ckpt = Path(cfg.checkpoint.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, ckpt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def validate(model, batches, precision) -> dict:
    """Token-weighted mean loss over the whole validation set, and its perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        with precision.context():
            total += float(causal_lm_loss(model, batch))
        tokens += count_label_tokens(batch)
    model.train()
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def finetune(cfg: Config, overwrite: bool = False) -> Path:
    # ---- setup ---------------------------------------------------------------------------------------------
    run_started = time.perf_counter()
    env: DistEnv = detect_env()
    check_wandb(cfg)
    run_dir, resume_from = prepare_run_dir(cfg, overwrite)
    dump_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.run.seed)
    precision = resolve_precision(cfg.model.dtype, env.device)

    tokenizer = load_tokenizer(cfg.model)
    train = prepare_source(cfg.data, cfg.data.train, tokenizer)
    val = prepare_source(cfg.data, cfg.data.validation, tokenizer) if cfg.data.validation else None

    model = load_model(cfg.model)
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft)
    model.to(env.device).train()
    trainable, total = count_parameters(model)

    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * env.world_size)
    loader = build_train_loader(train.examples, t.micro_batch_size, tokenizer.pad_token_id, cfg.run.seed,
                                env.rank, env.world_size)
    per_epoch = loader.batch_sampler.per_rank / accum
    total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * per_epoch))
    val_batches = (build_eval_batches(val.examples, t.micro_batch_size, tokenizer.pad_token_id,
                                      env.rank, env.world_size) if val else [])
    optimizer = build_optimizer(model, t.optimizer)
    scheduler = build_scheduler(optimizer, t.lr_scheduler, total_steps)

    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model, optimizer, scheduler, loader)
    sink = MetricsSink(run_dir, cfg, total_steps, start_step, to_dict(cfg))
    sink.info(f"model {cfg.model.name_or_path}: {trainable:,} trainable / {total:,} parameters "
              f"({100 * trainable / total:.2f}%), {precision.name} on {env.device}")
    if cfg.peft is not None:
        sink.info(f"adapter {cfg.peft.method}: {adapter_summary(model)}")
    sink.info(f"data: train {train.stats.summary()}" + (f"; validation {val.stats.summary()}" if val else ""))
    sink.info(f"batch: {t.global_batch_size} = micro {t.micro_batch_size} x accumulation {accum} x "
              f"{env.world_size} process(es); {total_steps} steps ({per_epoch:.1f} per epoch)"
              + (f"; resuming after step {start_step} from {resume_from}" if resume_from else ""))

    squad = build_training_squad(cfg, tokenizer, model, precision)
    if start_step == 0:
        baseline = validate(model, val_batches, precision) if val_batches else {}  # the baseline the run improves on
        baseline.update(squad.at(0, total_steps, model) if squad else {})
        if baseline:
            sink.log(0, baseline)

    # ---- train ---------------------------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    last_step = min(total_steps, t.stop_at_step or total_steps)
    for step in range(start_step + 1, last_step + 1):
        started = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]
        step_tokens = sum(count_label_tokens(mb) for mb in micro_batches)
        loss_sum = 0.0
        for mb in micro_batches:
            mb = {k: v.to(env.device) for k, v in mb.items()}
            with precision.context():
                loss = causal_lm_loss(model, mb)
            (loss / max(step_tokens, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {}
        if step % t.log_every_steps == 0 or step == total_steps:
            seconds = time.perf_counter() - started
            real_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
            metrics = {"loss": float(loss_sum) / max(step_tokens, 1), "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": real_tokens / seconds, "label_tokens": step_tokens,
                       "epoch": step / per_epoch, "step_seconds": seconds, "peak_rss_mb": _peak_rss_mb()}
        if val_batches and ((t.val_every_steps and step % t.val_every_steps == 0) or step == total_steps):
            metrics.update(validate(model, val_batches, precision))
        if squad is not None:
            metrics.update(squad.at(step, total_steps, model))
        if metrics:
            sink.log(step, metrics)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < last_step:
            save_checkpoint(run_dir / "checkpoints", step, model, optimizer, scheduler, loader,
                            {"run": cfg.run.name}, cfg.checkpoint.keep_last)

    # ---- finish --------------------------------------------------------------------------------------------
    stopped_early = last_step < total_steps
    if (cfg.checkpoint.every_steps or stopped_early) and last_step > start_step:
        save_checkpoint(run_dir / "checkpoints", last_step, model, optimizer, scheduler, loader,
                        {"run": cfg.run.name}, cfg.checkpoint.keep_last)
    if stopped_early:
        sink.info(f"stopped after step {last_step} of {total_steps} (train.stop_at_step); "
                  f"run the same command again to continue")
    else:
        save_final(model, tokenizer, cfg, run_dir / "final")
        sink.info(summarize(run_dir / "metrics.jsonl", time.perf_counter() - run_started))
    sink.close()
    if not stopped_early:
        sink.info(f"report: {write_report(run_dir)}")
    return run_dir


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
    return "done: " + "; ".join(parts) + f"; output in {metrics_path.parent / 'final'}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
