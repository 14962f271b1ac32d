"""Where training metrics go: metrics.jsonl (always), TensorBoard, W&B, and the console."""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.files import write_atomic


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop lines of steps that will be run again, so the file reads as one uninterrupted run. A run
    that starts over (no checkpoint yet) logs its step-0 baseline again, so then every line goes."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if after_step and _step_of(line) is not None and _step_of(line) <= after_step]
    write_atomic(path, "".join(line + "\n" for line in keep))  # a crash mid-rewrite leaves the old file whole


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def step_row(result, lr: float, tokens: int, seconds: float, counts: str, epoch: float, skipped: int) -> dict:
    """A logged step's metrics: the step's result (train_step's StepResult: loss, grad_norm, what the loss was divided
    by under the objective's name `counts`, the objective's own metrics), throughput over the real (non-padding)
    tokens of all ranks, and the process's peak resident memory."""
    return {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": tokens,
            "tokens_per_s": tokens / seconds, counts: result.label_tokens, **result.metrics, "epoch": epoch,
            "step_seconds": seconds, "peak_rss_mb": peak_rss_mb(), **({"skipped_steps": skipped} if skipped else {})}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsSink:
    def __init__(self, run_dir: Path, cfg: Config, total_steps: int, start_step: int, config_dict: dict):
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        self.total = total_steps
        self.tb = self.wandb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if cfg.logging.wandb is not None:
            import wandb
            self.wandb = wandb.init(project=cfg.logging.wandb.project, name=cfg.logging.wandb.name or cfg.run.name,
                                    config=config_dict, dir=str(run_dir), resume="allow")
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.console = Console(stderr=False)
        self.progress = None
        if cfg.logging.progress and self.console.is_terminal:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()
        self.print_every = max(1, total_steps // 10)
        self.started = time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and self.tb is not None:
                self.tb.add_scalar(_tb_tag(key), value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=_short(metrics))
        if step % self.print_every == 0 or step == self.total or "val_loss" in metrics or "squad_f1" in metrics \
                or "val_reward" in metrics:
            self.info(f"step {step:>5}/{self.total}  {_short(metrics)}")

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _tb_tag(key: str) -> str:
    if "/" in key:
        return key
    if key.startswith("val"):
        return f"val/{key}"
    if key.startswith("squad"):
        return f"eval/{key}"
    return f"train/{key}"


# The console line of a logged step: (key that must be present, format of the metrics), in print order.
_CONSOLE = (("loss", "loss {loss:.4f}"), ("val_loss", "val_loss {val_loss:.4f}"),
            ("val_accuracy", "accuracy {val_accuracy:.3f} macro-F1 {val_macro_f1:.3f}"),
            ("rewards/accuracies", "reward acc {m[rewards/accuracies]:.2f} margin {m[rewards/margins]:.3f}"),
            ("val_rewards/accuracies", "val reward acc {m[val_rewards/accuracies]:.2f} margin "
                                       "{m[val_rewards/margins]:.3f}"),
            ("reward", "reward {reward:.3f} std {reward_std:.3f} zero-std groups {frac_reward_zero_std:.2f}"),
            ("val_reward", "val reward {val_reward:.3f}"),
            ("squad_f1", "squad EM {squad_em:.1f} F1 {squad_f1:.1f}"), ("lr", "lr {lr:.2e}"),
            ("tokens_per_s", "{tokens_per_s:,.0f} tok/s"))


def _short(m: dict) -> str:
    """Keys that are not names (rewards/margins) are read as {m[key]}."""
    return "  ".join(form.format(**m, m=m) for key, form in _CONSOLE if key in m)

