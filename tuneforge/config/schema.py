"""The typed recipe schema. Every field carries a one-line help text, used by `tuneforge finetune --help-config`
and in error messages. Names follow DESIGN.md; later capabilities add fields here, never rename them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from tuneforge.config.peft_methods import METHOD_HELP, METHOD_NAMES
from tuneforge.config.preference_losses import LOSS_HELP, LOSS_NAMES, WITH_REFERENCE
from tuneforge.config.rewards import REWARD_NAMES


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
    name_or_path: str = doc("Hugging Face Hub id or local directory of a transformers model, or a local .gguf file "
                            "(dequantized once to a cached transformers directory, which becomes the base model)", "")
    gguf_file: Optional[str] = doc(
        "a GGUF file inside name_or_path (a Hub repo id or a local directory), e.g. model.Q4_K_M.gguf; null = "
        "name_or_path is a transformers model (or itself a .gguf file)", None)
    kind: Literal["auto", "causal_lm", "seq2seq", "sequence_classification"] = doc(
        "model family: causal_lm (AutoModelForCausalLM), seq2seq (AutoModelForSeq2SeqLM: T5, BART; the prompt goes "
        "to the encoder, the answer to the decoder), sequence_classification (AutoModelForSequenceClassification); "
        "auto = from the checkpoint's config (its architectures, else is_encoder_decoder), causal_lm when unclear",
        "auto")
    dtype: Literal["auto", "float32", "bfloat16"] = doc(
        "compute dtype: auto = bf16 autocast on capable CPUs and CUDA, else fp32; master weights stay fp32", "auto")
    frozen_dtype: Literal["auto", "float32"] = doc(
        "adapter runs: auto = keep the frozen linear weights in the compute dtype (bf16 under autocast: the values "
        "autocast would cast them to, at half the memory and without re-casting them every step); float32 keeps "
        "them fp32", "auto")
    attn_implementation: Optional[str] = doc(
        "attention backend: auto = flash_attention_2 on CUDA where flash-attn is installed and the architecture "
        "supports it, else sdpa where the architecture has it, else the model's own (eager); or one that transformers "
        "knows: sdpa, eager, flash_attention_2, flex_attention (refused where the architecture lacks it)", "auto")
    packed_attention: Literal["per_example", "block_mask"] = doc(
        "data.batching=packing with sdpa: per_example = causal attention within each example's own block of the row "
        "(no row-wide mask, no scores across examples); block_mask = transformers' sdpa over the whole row under a "
        "block-diagonal mask. Same values (bf16: to bf16 rounding); flash_attention_2 is per example by itself; with "
        "train.compile the compiled layers keep block_mask", "per_example")
    trust_remote_code: bool = doc("run model code shipped with the checkpoint (only for sources you trust)", False)
    revision: Optional[str] = doc("Hub revision (branch, tag or commit) when name_or_path is a Hub id", None)
    quantization: Optional[QuantizationConfig] = doc(
        "load the frozen base weights quantized with bitsandbytes (QLoRA; needs peft and the `qlora` extra); "
        "null = full precision", None)
    head: Optional[HeadConfig] = doc(
        "sequence_classification: replace the model's linear classifier by an MLP (saved with its code: plain "
        "transformers loads it with trust_remote_code=True); null = the model's own linear head", None)
    init_from: Optional[str] = doc(
        "start from an earlier run's weights: its run directory (final/, else its newest checkpoint), a "
        "checkpoints/step_N or a final/ directory; full weights or the adapter (the peft section must match); "
        "optimizer, schedule, data position and step start fresh", None)
    weights_only: bool = doc(
        "init_from loads weights only (the one supported mode; checkpoint.resume continues a run's optimizer, "
        "schedule and step)", True)


@dataclass
class HeadConfig:
    hidden_layers: list[int] = doc("widths of the hidden layers between the pooled hidden state and the labels",
                                   factory=lambda: [256])
    dropout: float = doc("dropout before every layer of the head (training only)", 0.1)
    activation: Literal["gelu", "relu", "tanh"] = doc("non-linearity after each hidden layer", "gelu")


@dataclass
class QuantizationConfig:
    bits: Literal[4, 8] = doc("4 = QLoRA (nf4/fp4 blocks), 8 = LLM.int8 weights", 4)
    quant_type: Literal["nf4", "fp4"] = doc("4-bit data type (bits: 4 only)", "nf4")
    double_quant: bool = doc("also quantize the per-block scales, ~0.4 bit/parameter less memory (bits: 4 only)", True)
    compute_dtype: Literal["bfloat16", "float32"] = doc("dtype the 4-bit matmuls run in (bits: 4 only)", "bfloat16")


@dataclass
class PeftConfig:
    method: Literal[METHOD_NAMES] = doc(METHOD_HELP, "lora")  # the methods of config/peft_methods.py
    lora_rank: int = doc("LoRA rank r (lora)", 8)
    lora_alpha: float = doc("LoRA scaling alpha (scale = alpha / r, or alpha / sqrt(r) with use_rslora) (lora)", 16)
    lora_dropout: float = doc("dropout on the LoRA input (lora)", 0.0)
    lora_bias: Literal["none", "all", "lora_only"] = doc(
        "which biases train alongside LoRA (peft `bias`) (lora)", "none")
    target_modules: Union[list[str], str] = doc(
        "module names to adapt: a list, a regex string, or 'all-linear' (lora, ia3)", "all-linear")
    use_dora: bool = doc("DoRA: learn a per-output-channel magnitude beside the LoRA direction (lora)", False)
    use_rslora: bool = doc("rank-stabilised LoRA: scale = alpha / sqrt(r) (lora)", False)
    modules_to_save: Optional[list[str]] = doc(
        "extra modules trained in full and saved with the adapter, e.g. [lm_head] (lora, ia3)", None)
    feedforward_modules: Optional[Union[list[str], str]] = doc(
        "IA3: target modules whose input (not output) is scaled; null = peft's per-architecture default "
        "(the MLP down projection) (ia3)", None)
    num_virtual_tokens: int = doc(
        "virtual tokens prepended to every sequence (prompt_tuning, p_tuning, prefix_tuning)", 20)
    prompt_init_text: Optional[str] = doc(
        "initialise the virtual tokens from this text's embeddings; null = random (prompt_tuning)", None)
    encoder_type: Literal["MLP", "LSTM"] = doc("prompt encoder network (p_tuning)", "MLP")
    encoder_hidden_size: int = doc(
        "hidden size of the prompt encoder (p_tuning) / of the prefix projection (prefix_tuning)", 128)
    encoder_num_layers: int = doc("layers of the prompt encoder (p_tuning)", 2)
    prefix_projection: bool = doc("reparameterise the prefix through a 2-layer MLP (prefix_tuning)", False)
    adapter_len: int = doc("adaption-prompt tokens per adapted layer (llama_adapter)", 10)
    adapter_layers: Optional[int] = doc("adapt the top N decoder layers; null = all (llama_adapter)", None)
    bottleneck_size: int = doc("bottleneck width of each adapter: hidden -> size -> hidden (adapter)", 16)
    bottleneck_activation: Literal["relu", "gelu", "silu"] = doc(
        "non-linearity inside the bottleneck (adapter)", "relu")


@dataclass
class DataSource:
    path: str = doc(
        "data file (json / jsonl / arrow / parquet / txt), a saved `datasets` directory, or a Hub dataset id", "")
    format: Literal["squad", "alpaca", "dolly", "input_output", "chat", "text", "classification", "preference",
                    "prompt"] = doc(
        "record format: squad (v1.1/v2 json), alpaca, dolly, input_output, chat (OpenAI messages), text, "
        "classification (a text and a label per row; model.kind: sequence_classification), preference (prompt, "
        "chosen and rejected per row, as strings or chat messages; needs the preference section), prompt (a prompt "
        "per row, as a string or chat messages, its other columns kept for the rewards; needs the rl section)",
        "squad")
    limit: Optional[int] = doc("use only the first N examples", None)
    name: Optional[str] = doc("name in reports and in metrics (val_loss/<name>); default: the file name", None)
    weight: float = doc("sampling weight among several training sources (share of the drawn examples)", 1.0)
    columns: Optional[dict] = doc("map the format's fields to this data's column names, e.g. {output: answer}", None)
    prompt_template: Optional[str] = doc(
        "this source's prompt with {field} placeholders (overrides data.prompt_template)", None)
    truncation: Literal["auto", "left", "drop"] = doc(
        "over-long examples: auto = shorten the context (squad, dolly), keep the start (classification), else cut "
        "the prompt's left; left; drop", "auto")
    unanswerable: Optional[str] = doc(
        "SQuAD v2 questions without an answer: null = skip them, or a fixed answer text", None)
    split: str = doc("split of a Hub dataset or a saved DatasetDict", "train")


@dataclass
class DataConfig:
    train: Union[DataSource, list[DataSource]] = doc(
        "training data: one source, or a list of sources sampled by their `weight`", factory=DataSource)
    validation: Union[DataSource, list[DataSource], None] = doc(
        "validation data (optional): one source, or a list of named sets reported separately", None)
    seq_length: int = doc(
        "maximum tokens per example; longer prompts are truncated (context first), never the answer", 512)
    prompt_template: Optional[str] = doc(
        "prompt with {field} placeholders; default per format "
        "(squad: 'Context: {context} Question: {question} Answer:')", None)
    train_on_inputs: bool = doc("also compute the loss on prompt tokens", False)
    batching: Literal["pad_longest", "pad_to_max_length", "group_by_length", "packing"] = doc(
        "pad_longest; pad_to_max_length (seq_length); group_by_length (similar lengths per batch); packing "
        "(several examples per row of seq_length, no cross-attention; micro_batch_size counts rows)", "pad_longest")
    val_split: Optional[float] = doc(
        "hold out training examples as validation (no validation given): a fraction below 1 (0.05), or a number of "
        "examples (2000), taken from each source in proportion to its size", None)
    chat_template: Optional[str] = doc("Jinja chat template for format chat (and prompt_style chat) when the "
                                       "tokenizer has none", None)
    prompt_style: Literal["plain", "chat"] = doc(
        "plain = the prompt template's text as it is; chat = the rendered prompt is the user turn and the answer the "
        "assistant turn, through the chat template: a chat model is trained, validated, scored (eval.squad, "
        "tuneforge eval) and shown examples (generate --examples) the way it is asked", "plain")
    system_prompt: Optional[str] = doc("system turn before each prompt with prompt_style chat (null: none)", None)
    labels: Optional[list[str]] = doc(
        "classification: the label names in id order (integer labels in the data index them); null = the sorted "
        "distinct labels of the training data", None)
    shuffle: bool = doc("shuffle the training examples each epoch (seeded); false = file order, sources one after "
                        "another (their weights unused)", True)
    num_workers: int = doc("background processes that collate micro-batches ahead of the step (0 = in the training "
                           "process; collation is cheap next to a step)", 0)
    cache: bool = doc("reuse tokenized data when the files, tokenizer, template and lengths are unchanged", True)
    cache_dir: Optional[str] = doc(
        "tokenized-data cache (default $TUNEFORGE_CACHE_DIR or ~/.cache/tuneforge/data)", None)


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adam"] = doc("optimizer", "adamw")
    lr: float = doc("peak learning rate", 2e-4)
    weight_decay: float = doc("decoupled weight decay (adamw) / L2 (adam)", 0.0)
    betas: list[float] = doc("Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = doc("Adam epsilon", 1e-8)
    fused: Optional[bool] = doc("fused Adam(W) kernel (one pass over all parameters); null = on where torch has it "
                                "for the device (CPU and CUDA)", None)


@dataclass
class SchedulerConfig:
    name: Literal["constant", "cosine", "linear"] = doc("learning-rate schedule after warmup", "constant")
    warmup_steps: int = doc("linear warmup steps from 0 to lr", 0)
    min_lr_ratio: float = doc("final lr as a fraction of lr (cosine, linear)", 0.0)


@dataclass
class TrainableConfig:
    top_layers: Optional[int] = doc("train the top N decoder layers (0 = none)", None)
    patterns: list[str] = doc("also train parameters whose name matches one of these regexes (re.search)", factory=list)
    lm_head: bool = doc("also train the output layer (tied to the embeddings in some models: set both then)", False)
    embeddings: bool = doc("also train the input token embeddings", False)
    head: bool = doc("sequence_classification: also train the classification head (with model.head: all its "
                     "layers); alone it is head-only training of a frozen model", False)


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
    max_bad_steps: int = doc("abort after N consecutive steps with a non-finite loss or gradient (each is skipped)",
                             5)
    trainable: Optional[TrainableConfig] = doc(
        "partial fine-tuning (peft: null): train only these parts, freeze the rest; null = train every weight", None)
    release_memory_every_steps: Optional[int] = doc(
        "CPU: return freed heap memory to the OS every N steps (glibc malloc_trim). Without it the resident size "
        "grows step after step as the allocator keeps freed activations; costs ~5% of speed at 2; null = never", 2)
    lora_forward: Literal["tuneforge", "peft"] = doc(
        "LoRA layers' forward: tuneforge = the update added in place into the base output, and the layers that read "
        "one input share its cast and one down-projection product (peft's values to rounding; less memory and faster "
        "on CPU; taken only with the peft versions it is tested with, else peft's, said in the log); peft = peft's own "
        "forward", "tuneforge")
    compile: bool = doc("torch.compile the model (the first steps are slower while it compiles; on CPU it needs a C++ "
                        "compiler)", False)
    head_on_labels_only: bool = doc(
        "run the LM head and the cross-entropy only at positions that carry a label (false: logits for every "
        "position, as a plain forward computes them)", True)
    loss_chunk_tokens: int = doc(
        "labelled positions per chunk of the fused LM head + cross-entropy: at most this many rows of fp32 logits "
        "exist at once; 0 = one chunk", 1024)


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
class MixedPrecisionConfig:
    param_dtype: Optional[Literal["float32", "bfloat16"]] = doc(
        "FSDP2 all-gather / compute dtype of parameters (null = the model's compute dtype)", None)
    reduce_dtype: Optional[Literal["float32", "bfloat16"]] = doc("FSDP2 gradient reduce dtype (null = float32)", None)


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp2"] = doc(
        "auto = single for one process, fsdp2 when sharding is asked for (cpu_offload, dp_replicate), else ddp", "auto")
    dp_replicate: int = doc("HSDP: replicas of the sharded model (e.g. nodes); 1 = plain FSDP over all ranks", 1)
    cpu_offload: bool = doc("FSDP2: keep sharded parameters, gradients and optimizer state in CPU memory", False)
    activation_checkpointing: bool = doc(
        "recompute each decoder layer's activations in backward (non-reentrant; any strategy, QLoRA included): "
        "less memory, ~30% more compute", False)
    reshard_after_forward: bool = doc("FSDP2: free gathered layer weights after forward (less memory, more comms)",
                                      True)
    mixed_precision: MixedPrecisionConfig = doc("FSDP2 mixed-precision policy", factory=MixedPrecisionConfig)


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
class PreferenceConfig:
    loss_type: Literal[LOSS_NAMES] = doc(LOSS_HELP, "sigmoid")  # the losses of config/preference_losses.py
    beta: float = doc(f"beta: the strength of the implicit KL penalty ({'/'.join(WITH_REFERENCE)}), the reward "
                      "scale (simpo, often 2-10), the odds-ratio weight lambda (orpo)", 0.1)
    label_smoothing: float = doc(
        "sigmoid (conservative DPO) and robust: the assumed probability that a pair's preference is flipped, in "
        "[0, 0.5)", 0.0)
    rpo_alpha: Optional[float] = doc(
        "add rpo_alpha x the SFT loss on the chosen completion (RPO), per chosen token of the step; null = off",
        None)
    simpo_gamma: float = doc("simpo: the target reward margin gamma", 0.5)
    max_prompt_length: Optional[int] = doc(
        "keep at most this many prompt tokens (cut by truncation_mode); null = only what seq_length needs", None)
    truncation_mode: Literal["keep_end", "keep_start"] = doc(
        "how an over-long prompt is cut: keep_end keeps its end (and a leading bos), keep_start its start; the "
        "completions are cut (their end) only when they alone overflow seq_length", "keep_end")
    reference: Literal["auto", "adapter_off", "precomputed"] = doc(
        f"the reference model ({'/'.join(WITH_REFERENCE)}): adapter_off = the same weights with the adapter switched "
        "off (LoRA/IA3, no second copy); precomputed = log-probs of the starting model, computed in one eval-mode "
        "pass before training and stored with the run (reference_logps.safetensors); auto = adapter_off for a "
        "LoRA/IA3 run started from the base model, precomputed otherwise (full fine-tuning, fsdp2, model.init_from)",
        "auto")


@dataclass
class RewardSpec:
    function: str = doc(f"a built-in reward ({', '.join(REWARD_NAMES)}) or a function by import path "
                        "(my_rewards:score) called as TRL calls one: prompts=, completions=, completion_ids=, the "
                        "record's other columns as keyword lists; it returns one float (or None) per completion", "")
    weight: float = doc("its weight in the summed reward", 1.0)
    name: Optional[str] = doc("its name in metrics (rewards/<name>/mean); default: the function's name", None)
    column: Optional[str] = doc("exact_match: the record's column holding the expected answer", None)
    pattern: Optional[str] = doc("regex: the pattern the whole completion must match", None)
    target: Optional[int] = doc("length: the completion length (characters) rewarded most", None)


@dataclass
class RLConfig:
    rewards: list[RewardSpec] = doc("the reward functions, summed with their weights (at least one)", factory=list)
    num_generations: int = doc("completions sampled per prompt (G, a group); train.global_batch_size counts "
                               "completions and is a multiple of it (TRL: num_generations)", 8)
    max_completion_length: int = doc("tokens a completion may have; one that reaches it without eos or end of turn "
                                     "is truncated (TRL: max_completion_length)", 256)
    max_prompt_length: Optional[int] = doc(
        "prompt tokens kept (the context is cut, as for evaluation); null = data.seq_length - max_completion_length",
        None)
    temperature: float = doc("sampling temperature; the log-probs the loss reads are of logits / temperature", 1.0)
    top_p: float = doc("nucleus sampling: keep the smallest set of tokens whose probability reaches top_p", 1.0)
    top_k: int = doc("sample among the k likeliest tokens (0 = all)", 0)
    generation_batch_size: Optional[int] = doc(
        "completions per generation batch on a process (null = all of a step's at once)", None)
    beta: float = doc("weight of the KL penalty to the reference (k3 estimator); 0 = no reference (TRL: beta)", 0.0)
    kl_ratio_correction: bool = doc(
        "multiply the KL term by the ratio pi / pi_old, which makes its gradient the unbiased reverse-KL gradient "
        "and changes it even where the ratio is 1 (TRL: use_bias_correction_kl, default true there too)", True)
    reference: Literal["auto", "adapter_off", "copy"] = doc(
        "the reference when beta > 0: adapter_off = the same weights with the adapter switched off (LoRA/IA3, no "
        "second copy); copy = a frozen copy of the starting model; auto = adapter_off for a LoRA/IA3 run started from "
        "the base model, else copy", "auto")
    epsilon: float = doc("clipping: the ratio pi / pi_old is kept within [1 - epsilon, 1 + epsilon_high]", 0.2)
    epsilon_high: Optional[float] = doc("upper clipping bound (DAPO: 0.28); null = epsilon", None)
    num_iterations: int = doc("optimizer steps per generation batch (mu); ratios are taken against the log-probs of "
                              "the weights that sampled (TRL: num_iterations)", 1)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = doc(
        "grpo = each completion's token mean, averaged over completions; dapo = every completion token of the step "
        "(all micro-batches and processes) counts once; dr_grpo = the token sum over completions x "
        "max_completion_length; bnpo = each micro-batch's token mean (TRL's, which depends on the split)", "dapo")
    scale_rewards: Literal["group", "batch", "none"] = doc(
        "advantage = reward - its group's mean, divided by the std of its group, of the whole step's rewards, or "
        "by nothing", "group")
    mask_truncated_completions: bool = doc("completions cut at max_completion_length count for nothing in the loss",
                                           False)
    log_completions: int = doc("completions written to <run>/completions.jsonl at each generation (0 = none)", 4)


@dataclass
class Config:
    run: RunConfig = doc("run identity and seed", factory=RunConfig)
    model: ModelConfig = doc("base model", factory=ModelConfig)
    peft: Union[PeftConfig, list[PeftConfig], None] = doc(
        "null = full (or partial, see train.trainable) fine-tuning; otherwise the adapter to train, or a list of "
        "adapters trained together (e.g. lora + prompt_tuning)", None)
    data: DataConfig = doc("training and validation data", factory=DataConfig)
    train: TrainConfig = doc("optimisation", factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("resumable checkpoints", factory=CheckpointConfig)
    logging: LoggingConfig = doc("metrics sinks", factory=LoggingConfig)
    distributed: DistributedConfig = doc("data-parallel training under torchrun (DDP / FSDP2 / HSDP)",
                                         factory=DistributedConfig)
    eval: EvalConfig = doc("task evaluation by generation, during training and by `tuneforge eval`", factory=EvalConfig)
    preference: Optional[PreferenceConfig] = doc(
        "preference tuning on chosen/rejected pairs (DPO and its family; data format preference); null = "
        "supervised fine-tuning", None)
    rl: Optional[RLConfig] = doc(
        "online RL with verifiable rewards (GRPO and its loss family): the policy samples completions of the data's "
        "prompts, the rewards score them, the step learns; null = supervised fine-tuning", None)
