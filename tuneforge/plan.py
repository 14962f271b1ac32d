"""`tuneforge plan`: a recipe's peak memory and step time per process, before any training or download of weights.

Memory, per process:
  weights      every parameter at the dtype training keeps it in: fp32 master weights; frozen linear weights of an
               adapter run in the autocast dtype (model.frozen_dtype: auto); QLoRA's 4-bit weights at half a byte
               plus their block scales. FSDP2 divides them over the data-parallel shards.
  gradients    fp32, trainable parameters only (sharded under FSDP2).
  optimizer    Adam(W): two fp32 moments per trainable parameter (sharded under FSDP2).
  activations  what autograd keeps for backward in one micro-batch, traced rather than guessed: the model's forward
               runs on fake tensors (shapes and dtypes only: no memory, no arithmetic) at 1 x seq_length under the
               recipe's precision and adapters, every saved tensor is counted once, and the sum is scaled by
               micro_batch_size. With activation checkpointing only each layer's input stays, plus one layer's
               activations while it is recomputed. The loss adds its labelled positions' hidden states and one chunk
               of fp32 logits (train.loss_chunk_tokens).
  runtime      this process with torch and transformers loaded (measured here) plus the working memory a training
               process adds (data pipeline, autograd; calibrated, see WORKING_SET) and, under FSDP2, one gathered
               layer. Activations are counted for full rows of seq_length (packing; with padding to the longest
               example of a micro-batch the estimate is an upper bound) plus backward's temporaries.
Step time: model FLOPs of one optimizer step (2 per weight per token forward; 2 backward for the input gradients
and 2 more where weights train; the LM head on labelled positions) divided by the matmul throughput measured on
this machine's device in the recipe's precision, times the efficiency the training loop reaches on it
(benchmarks/RESULTS.md). A causal LM that is not a plain decoder stack is planned all the same: the trace does not
depend on the architecture. Encoder-decoder (seq2seq) models are not planned.
A preference run's micro-batch of n pairs is 2n sequences (chosen and rejected); with the adapter switched off as
the reference, each step also runs a forward without backward over them; precomputed reference log-probs cost one
forward pass over the data before the first step, and no memory during training.
An online RL run (rl section) also generates: its memory adds the KV cache and one step's fp32 logits of a generation
batch (rows of seq_length tokens), which live while no activations do (the larger of the two counts), and a frozen copy
of the weights where the reference is a copy; its time adds the prefill and the decode steps of the step's
completions, at the same efficiency as training."""
from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass

import torch

from tuneforge.config.rules.distributed import resolve_strategy
from tuneforge.config.rules.preference import reference_kind
from tuneforge.config.rules.rl import rl_reference_kind
from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.models.head import split_parts
from tuneforge.models.kind import resolve_kind
from tuneforge.models.layers import decoder_layers
from tuneforge.models.load import count_parameters, load_model_skeleton, resolve_precision, store_frozen_linears
from tuneforge.peft import apply_finetuning

GiB = 2**30
LOOP_EFFICIENCY = 0.2  # measured tokens x model FLOPs / measured matmul peak of the training loop (bench_sft.py)
# Calibrated against measured peak RSS (benchmarks/bench_plan.py): backward's temporaries (activation gradients, the
# allocator's slack) add about half of the saved activations, and a training process holds ~0.45 GiB beyond its
# imports (data pipeline, autograd and thread-pool working memory).
BACKWARD_SLACK = 1.5
WORKING_SET = 0.45 * 2**30
LABELLED_SHARE = 0.1  # share of positions with a label when the loss skips the prompt (SQuAD-like data: 3-10%)


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    runtime: float
    generation: float = 0.0  # online RL: KV cache and logits of a generation batch (not alive with activations)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + max(self.activations + self.loss, self.generation)
                + self.runtime)


@dataclass
class TracedModel:
    """What one micro-batch of one sequence costs, from the model built on fake tensors."""
    params: int
    trainable: int
    weight_bytes: float
    trainable_linear: int
    frozen_linear: int
    saved_per_sequence: float  # bytes autograd keeps for one sequence of seq_length tokens
    layer_input_per_token: float  # bytes of one decoder layer's input per token (what checkpointing keeps)
    layers: int
    hidden: int
    vocab: int
    plain_head: bool
    kv_per_token: float = 0.0  # bytes of the KV cache per token, all layers, in the compute dtype


def plan(cfg: Config, world_size: int = 1, device: str | None = None) -> str:
    """The report `tuneforge plan` prints."""
    import tuneforge.train.recipe  # noqa: F401 - what a training process imports is part of its baseline
    if resolve_kind(cfg.model) == "seq2seq":  # the trace feeds decoder-only inputs
        raise UserError(f"tuneforge plan covers causal LMs; '{cfg.model.name_or_path}' is a seq2seq model, whose "
                        "memory it does not estimate")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    strategy = resolve_strategy(cfg.distributed, world_size)
    precision = resolve_precision(cfg.model.dtype, device)
    facts = trace_model(cfg, precision.autocast, strategy)
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * world_size)
    shards = world_size if strategy == "fsdp2" else 1
    checkpointing = cfg.distributed.activation_checkpointing
    micro = t.micro_batch_size * sequences_per_example(cfg)
    columns = {"this recipe": memory(cfg, facts, micro, checkpointing, shards)}
    other = memory(cfg, facts, micro, not checkpointing, shards)
    columns["checkpointing " + ("off" if checkpointing else "on")] = other
    if world_size > 1 and strategy != "fsdp2":
        columns[f"fsdp2 x{world_size}"] = memory(cfg, facts, micro, checkpointing, world_size)
    available, where = available_memory(device)
    fits = columns["this recipe"].total <= 0.9 * available
    lines = [f"model {cfg.model.name_or_path}: {facts.params / 1e6:,.1f}M parameters, {facts.trainable / 1e6:,.2f}M "
             f"trainable; {precision.name} on {device}; {strategy} x{world_size}; micro batch "
             f"{t.micro_batch_size} x {cfg.data.seq_length} tokens x accumulation {accum}"
             + (preference_line(cfg, strategy) if cfg.preference is not None else "")
             + (rl_line(cfg, strategy, world_size) if cfg.rl is not None else ""),
             "", f"{'peak memory per process (GiB)':<32}" + "".join(f"{name:>18}" for name in columns)]
    parts = ("weights", "gradients", "optimizer", "activations", "loss") + (("generation",) if cfg.rl else ()) + \
        ("runtime", "total")
    for part in parts:
        label = {"loss": "loss (head + logits chunk)", "runtime": "runtime (torch, libraries)",
                 "generation": "generation (KV cache, logits)", "total": "peak (estimate)"}.get(part, part)
        lines.append(f"{label:<32}" + "".join(f"{getattr(e, part) / GiB:>18.2f}" for e in columns.values()))
    lines += ["", f"{device}: {available / GiB:.1f} GiB {where} -> "
              + ("fits" if fits else "does NOT fit: " + oom_advice(columns, available))]
    best = suggest_micro_batch(cfg, facts, checkpointing, shards, available)
    lines.append(f"suggested micro batch: {best}" if best else
                 "suggested micro batch: none fits; see the advice above")
    seconds, flops = step_time(cfg, facts, precision.autocast, device, world_size, checkpointing)
    tokens = t.global_batch_size * cfg.data.seq_length * sequences_per_example(cfg)
    lines.append(f"step time (estimate): {seconds:.2f} s per optimizer step of up to {tokens:,} tokens "
                 f"({flops / 1e12:.2f} TFLOP per process; ~{tokens / seconds / world_size:,.0f} tokens/s per process)")
    if cfg.rl is not None:
        gen_flops = generation_flops(cfg, facts, world_size)
        gen_seconds = gen_flops / (matmul_throughput(device, precision.autocast, facts.hidden) * LOOP_EFFICIENCY)
        lines.append(f"generation time (estimate): {gen_seconds:.2f} s per generation of "
                     f"{t.global_batch_size // world_size} completions per process ({gen_flops / 1e12:.2f} TFLOP), "
                     f"every {cfg.rl.num_iterations} step(s)")
    return "\n".join(lines)


def trace_model(cfg: Config, autocast, strategy: str) -> TracedModel:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = load_model_skeleton(cfg.model)
    plan_cfg = copy.deepcopy(cfg)
    plan_cfg.distributed.activation_checkpointing = False  # traced without; checkpointing is computed from layers
    quantized = cfg.model.quantization is not None
    plan_cfg.model.quantization = None  # bitsandbytes cannot quantize meta tensors: 4-bit bytes are counted below
    model = apply_finetuning(model, plan_cfg)
    if cfg.peft is not None and cfg.model.frozen_dtype == "auto" and autocast and strategy != "fsdp2":
        store_frozen_linears(model, autocast)
    trainable, params = count_parameters(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = [m for m in linears if m is not head]
    trainable_linear = sum(m.weight.numel() for m in body if m.weight.requires_grad)
    frozen_linear = sum(m.weight.numel() for m in body if not m.weight.requires_grad)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if quantized:  # frozen decoder linears become 4 or 8 bit (+ fp32 scales per 64-weight block for 4 bit)
        bits = cfg.model.quantization.bits
        weight_bytes -= sum(m.weight.numel() * (m.weight.element_size() - bits / 8 - (4 / 64 if bits == 4 else 0))
                            for m in body if not m.weight.requires_grad)
    layers = decoder_layers(model)
    hidden = model.config.get_text_config().hidden_size
    saved = _saved_bytes(model, cfg.data.seq_length, autocast, FakeTensorMode)
    vocab = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
    text = model.config.get_text_config()
    heads = getattr(text, "num_attention_heads", None) or 1
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = 2 * len(layers) * (getattr(text, "num_key_value_heads", None) or heads) * head_dim * (2 if autocast else 4)
    return TracedModel(params, trainable, weight_bytes, trainable_linear, frozen_linear, saved,
                      hidden * 4, len(layers), hidden, vocab, type(head) is torch.nn.Linear, kv)


def _saved_bytes(model, seq_length: int, autocast, fake_mode_cls) -> float:
    """Bytes autograd saves in the backbone's forward of one sequence, each storage once, parameters excluded."""
    split = split_parts(model)  # the skeleton has no weights to check it with: an estimate either way
    mode = fake_mode_cls(allow_non_fake_inputs=True)
    with mode:
        _fake_parameters(model)
        params = {id(p.untyped_storage()) for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            key = id(t.untyped_storage())
            if key not in params:
                saved[key] = t.untyped_storage().nbytes()
            return t

        ids = torch.zeros(1, seq_length, dtype=torch.long)
        positions = torch.arange(seq_length)[None]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                if split is not None:
                    split[0](input_ids=ids, position_ids=positions, use_cache=False)
                else:  # a head with its own forward: count the full-vocabulary logits too
                    model(input_ids=ids, position_ids=positions, use_cache=False)
        except Exception as e:  # noqa: BLE001 - an architecture the fake trace cannot run
            raise UserError(f"plan: cannot trace {type(model).__name__}'s forward on fake tensors ({e})") from None
    return float(sum(saved.values()))


def _fake_parameters(model) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same shape, dtype and trainability."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def sequences_per_example(cfg: Config) -> int:
    """Sequences a micro-batch example is: 2 for a preference pair (chosen and rejected), else 1."""
    return 2 if cfg.preference is not None else 1


def preference_line(cfg: Config, strategy: str) -> str:
    kind = reference_kind(cfg, strategy)
    how = {"none": "no reference", "adapter_off": "reference = adapter off (one more forward per step)",
           "precomputed": "reference log-probs precomputed (one forward pass over the pairs before step 1)"}[kind]
    return f"\npreference {cfg.preference.loss_type}: micro batch counts pairs, 2 sequences each; {how}"


def rl_line(cfg: Config, strategy: str, world_size: int) -> str:
    rl = cfg.rl
    how = {"none": "no reference (beta 0)", "adapter_off": "reference = adapter off (one more forward per micro-batch)",
           "copy": "reference = a frozen copy of the starting weights (counted in weights)"}[
        rl_reference_kind(cfg, strategy)]
    return (f"\nrl {rl.loss_type}: micro batch counts completions; {cfg.train.global_batch_size // world_size} "
            f"completions of up to {rl.max_completion_length} tokens generated per process per generation, "
            f"{generation_rows(cfg, world_size)} at a time; {how}")


def generation_rows(cfg: Config, world_size: int) -> int:
    """Completions one generate call holds on a process."""
    per_process = cfg.train.global_batch_size // world_size
    return min(cfg.rl.generation_batch_size or per_process, per_process)


def generation_flops(cfg: Config, f: TracedModel, world_size: int) -> float:
    """One generation on a process: the prompts' prefill (up to the prompt budget) and one decode step per completion
    token, each through every linear layer, and the LM head once per generated token."""
    rl = cfg.rl
    completions = cfg.train.global_batch_size // world_size
    prompt = rl.max_prompt_length or cfg.data.seq_length - rl.max_completion_length
    body = f.frozen_linear + f.trainable_linear
    return completions * ((prompt + rl.max_completion_length) * 2 * body
                          + rl.max_completion_length * 2 * f.hidden * f.vocab)


def memory(cfg: Config, f: TracedModel, micro: int, checkpointing: bool, shards: int) -> Estimate:
    seq = cfg.data.seq_length
    adam = 8 if cfg.train.optimizer.name in ("adam", "adamw") else 0
    if checkpointing:
        activations = micro * (seq * f.layer_input_per_token * f.layers + f.saved_per_sequence / max(f.layers, 1))
    else:
        activations = micro * f.saved_per_sequence
    activations *= BACKWARD_SLACK
    labelled = micro * seq * (1.0 if cfg.data.train_on_inputs else LABELLED_SHARE)
    if f.plain_head:  # hidden states and their gradient at labelled positions, one chunk of fp32 logits (+ bf16)
        chunk = min(labelled, cfg.train.loss_chunk_tokens or labelled)
        loss = labelled * f.hidden * 8 + chunk * f.vocab * 6
    else:
        loss = micro * seq * f.vocab * 4 * 2
    runtime = _rss_bytes() + WORKING_SET
    if shards > 1:  # one gathered layer while it runs
        runtime += f.weight_bytes / max(f.layers, 1)
    weights, generation = f.weight_bytes / shards, 0.0
    if cfg.rl is not None:
        rows = generation_rows(cfg, shards)
        # the KV cache of rows of seq_length tokens, and a decode step's fp32 logits, log-probs and sampling noise
        generation = rows * (seq * f.kv_per_token + 3 * 4 * f.vocab)
        if rl_reference_kind(cfg, "fsdp2" if shards > 1 else "single") == "copy":
            weights += f.weight_bytes
    return Estimate(weights, 4 * f.trainable / shards, adam * f.trainable / shards, activations, loss, runtime,
                    generation)


def suggest_micro_batch(cfg: Config, f: TracedModel, checkpointing: bool, shards: int, available: float) -> int | None:
    """The largest micro batch dividing the global batch whose estimate stays under 90% of the device."""
    best = None
    per_rank = cfg.train.global_batch_size
    seqs = sequences_per_example(cfg)
    for micro in range(1, per_rank + 1):
        if per_rank % micro == 0 and memory(cfg, f, micro * seqs, checkpointing, shards).total <= 0.9 * available:
            best = micro
    return best


def oom_advice(columns: dict[str, Estimate], available: float) -> str:
    mine = columns["this recipe"]
    biggest = max(("weights", "gradients", "optimizer", "activations", "loss"), key=lambda k: getattr(mine, k))
    advice = {"activations": "lower train.micro_batch_size (raise accumulation) or set "
                             "distributed.activation_checkpointing=true",
              "weights": "use an adapter (peft.method: lora), QLoRA (model.quantization.bits: 4) or fsdp2 over more "
                         "processes",
              "gradients": "train fewer weights (peft, train.trainable) or shard them with fsdp2",
              "optimizer": "train fewer weights (peft, train.trainable) or shard them with fsdp2 / cpu_offload",
              "loss": "lower train.loss_chunk_tokens"}[biggest]
    return f"{mine.total / GiB:.1f} GiB needed, {biggest} dominate: {advice}"


def available_memory(device: str) -> tuple[float, str]:
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return float(total), "GPU memory"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return float(info["MemAvailable"]), "available RAM"
    except (OSError, KeyError):
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"


def step_time(cfg: Config, f: TracedModel, autocast, device: str, world_size: int, checkpointing: bool
              ) -> tuple[float, float]:
    t = cfg.train
    tokens = t.global_batch_size * cfg.data.seq_length * sequences_per_example(cfg) / world_size
    labelled = tokens * (1.0 if cfg.data.train_on_inputs else LABELLED_SHARE)
    body = f.frozen_linear + f.trainable_linear
    per_token = 2 * body + 2 * body + 2 * f.trainable_linear + (2 * body if checkpointing else 0)
    strategy = resolve_strategy(cfg.distributed, world_size)
    if (cfg.preference is not None and reference_kind(cfg, strategy) == "adapter_off") or \
            (cfg.rl is not None and rl_reference_kind(cfg, strategy) != "none"):
        per_token += 2 * f.frozen_linear  # the reference's forward: the base weights, no backward
    flops = tokens * per_token + labelled * 4 * f.hidden * f.vocab
    return flops / (matmul_throughput(device, autocast, f.hidden) * LOOP_EFFICIENCY), flops


def matmul_throughput(device: str, dtype, hidden: int) -> float:
    """FLOP/s of a (4096 x hidden) @ (hidden x 4 hidden) product in the compute dtype on this device."""
    dtype = dtype or torch.float32
    a = torch.randn(4096, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, 4 * hidden, dtype=dtype, device=device)
    a @ b
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.5:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * 4096 * hidden * 4 * hidden * reps / (time.perf_counter() - started)


def _rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
