"""The typed recipe schema. Every field carries a one-line help text, used by `tuneforge finetune --help-config`
and in error messages. Names follow DESIGN.md; later capabilities add fields here, never rename them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


def doc(help: str, default: Any = None, factory: Any = None):
    """A dataclass field with a help string (the schema is the documentation)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = doc("run name; the run directory is <output_dir>/<name>", "run")
    output_dir: str = doc("parent directory of run directories", "runs")
    seed: int = doc("seed for weights init, data order, dropout; same seed on CPU = same loss curve", 42)


@dataclass
class ModelConfig:
    name_or_path: str = doc("Hugging Face Hub id or local directory of an AutoModelForCausalLM", "")
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "compute dtype: auto = bf16 autocast on capable CPUs and CUDA, else fp32; master weights stay fp32", "auto")
    attn_implementation: Optional[str] = doc("attention backend passed to transformers (sdpa, eager, flash_attention_2)", "sdpa")
    trust_remote_code: bool = doc("run model code shipped with the checkpoint (only for sources you trust)", False)
    revision: Optional[str] = doc("Hub revision (branch, tag or commit) when name_or_path is a Hub id", None)


@dataclass
class PeftConfig:
    method: Literal["lora"] = doc("PEFT method", "lora")
    lora_rank: int = doc("LoRA rank r", 8)
    lora_alpha: float = doc("LoRA scaling alpha (scale = alpha / r)", 16)
    lora_dropout: float = doc("dropout on the LoRA input", 0.0)
    lora_bias: Literal["none", "all", "lora_only"] = doc("which biases train alongside LoRA (peft `bias`)", "none")
    target_modules: Union[list[str], str] = doc(
        "module names to adapt: a list, a regex string, or 'all-linear'", "all-linear")


@dataclass
class DataSource:
    path: str = doc("data file (json / jsonl)", "")
    format: Literal["squad", "input_output"] = doc("record format of the file", "squad")
    limit: Optional[int] = doc("use only the first N examples", None)


@dataclass
class DataConfig:
    train: DataSource = doc("training data source", factory=DataSource)
    validation: Optional[DataSource] = doc("validation data source (optional)", None)
    seq_length: int = doc("maximum tokens per example; longer prompts are truncated (context first), never the answer", 512)
    prompt_template: Optional[str] = doc(
        "prompt with {field} placeholders; default per format (squad: 'Context: {context} Question: {question} Answer:')", None)
    train_on_inputs: bool = doc("also compute the loss on prompt tokens", False)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam"] = doc("optimizer", "adamw")
    lr: float = doc("peak learning rate", 2e-4)
    weight_decay: float = doc("decoupled weight decay (adamw) / L2 (adam)", 0.0)
    betas: list[float] = doc("Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = doc("Adam epsilon", 1e-8)


@dataclass
class SchedulerConfig:
    name: Literal["constant", "cosine", "linear"] = doc("learning-rate schedule after warmup", "constant")
    warmup_steps: int = doc("linear warmup steps from 0 to lr", 0)
    min_lr_ratio: float = doc("final lr as a fraction of lr (cosine, linear)", 0.0)


@dataclass
class TrainConfig:
    micro_batch_size: int = doc("examples per forward/backward pass on one process", 8)
    global_batch_size: int = doc("examples per optimizer step over all processes (= micro x accumulation x dp)", 8)
    max_steps: Optional[int] = doc("optimizer steps to run (overrides num_epochs)", None)
    num_epochs: float = doc("passes over the training data when max_steps is not set", 1.0)
    stop_at_step: Optional[int] = doc(
        "end this invocation after step N with a checkpoint, as if interrupted (the schedule still spans the whole "
        "run); rerun to continue", None)
    optimizer: OptimizerConfig = doc("optimizer settings", factory=OptimizerConfig)
    lr_scheduler: SchedulerConfig = doc("learning-rate schedule", factory=SchedulerConfig)
    grad_clip: Optional[float] = doc("clip the global gradient norm to this value (null = no clipping)", 1.0)
    val_every_steps: Optional[int] = doc("validation loss every N steps (and at the end); null = only at the end", None)
    log_every_steps: int = doc("write a metrics line every N steps", 1)


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = doc("write a resumable checkpoint every N steps (null = never)", None)
    keep_last: Optional[int] = doc("keep only the newest N checkpoints (null = all)", 2)
    resume: str = doc("auto = continue from the newest complete checkpoint if any; never; or a checkpoint path", "auto")


@dataclass
class WandbConfig:
    project: str = doc("W&B project", "tuneforge")
    name: Optional[str] = doc("W&B run name (default: run.name)", None)


@dataclass
class LoggingConfig:
    tensorboard: bool = doc("write TensorBoard events to <run>/tb", True)
    wandb: Optional[WandbConfig] = doc("log to Weights & Biases (needs the `wandb` extra)", None)
    progress: bool = doc("show a live progress bar on a terminal", True)


@dataclass
class SquadEvalConfig:
    path: Optional[str] = doc(
        "SQuAD json whose questions are answered (default: the first squad-format validation set)", None)
    every_steps: Optional[int] = doc(
        "answer the questions at step 0, every N steps and at the end; null = only at the end", None)
    limit: Optional[int] = doc(
        "answer only the first N questions during training (null = all); `tuneforge eval` answers all unless --limit",
        100)
    max_new_tokens: int = doc("tokens generated per answer (greedy, KV cache; stops at a newline or eos)", 32)
    batch_size: int = doc("prompts per generation batch (left-padded)", 16)


@dataclass
class EvalConfig:
    squad: Optional[SquadEvalConfig] = doc(
        "SQuAD exact match / F1 of generated answers, logged as squad_em / squad_f1 (null = off)", None)


@dataclass
class Config:
    run: RunConfig = doc("run identity and seed", factory=RunConfig)
    model: ModelConfig = doc("base model", factory=ModelConfig)
    peft: Optional[PeftConfig] = doc("null = full fine-tuning; otherwise the adapter to train", None)
    data: DataConfig = doc("training and validation data", factory=DataConfig)
    train: TrainConfig = doc("optimisation", factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("resumable checkpoints", factory=CheckpointConfig)
    logging: LoggingConfig = doc("metrics sinks", factory=LoggingConfig)
    eval: EvalConfig = doc("task evaluation by generation, during training and by `tuneforge eval`", factory=EvalConfig)
