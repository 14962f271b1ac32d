"""The options of the commands that read a finished run (eval, generate, report, export, push, merge, serve): one
dataclass per command, one documented field per flag. The command line's subparser is built from the dataclass
(`add_options`) and the Python API constructs the same dataclass, so a new flag is one field here plus its use.
Constructing options checks them (`__post_init__`), before any model is loaded."""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from tuneforge.errors import UserError

REQUIRED = dataclasses.MISSING


def option(help: str, default: Any = REQUIRED, *, factory: Any = None, env: str | None = None, **cli) -> Any:
    """A command's field with its one-line help. No default = a required flag. `env` = the default is that
    environment variable's value (read when the options or the parser are built). `cli` are the command line's
    details: metavar, positional, nargs, action ("append"), group (an argument group's title), one_of (a required
    choice among the fields of that name), at_least (the lowest value, checked on construction)."""
    meta = {"help": help, **cli}
    if env is not None:
        return dataclasses.field(default_factory=lambda: os.environ.get(env, default), metadata=meta)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(kw_only=True)
class RunOptions:
    """The options of a command that reads a finished run. Subclasses set COMMAND and SUMMARY (the one-line help in
    `tuneforge --help`); their docstring is the command's description in `tuneforge COMMAND --help`."""
    COMMAND = ""
    SUMMARY = ""
    run: str = option("run directory (runs/<name>)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            low, value = f.metadata.get("at_least"), getattr(self, f.name)
            if low is not None and value is not None and value < low:
                raise UserError(f"{flag(f)}: must be >= {low}, got {value}")
        self.check()

    def check(self) -> None:
        """The rules between fields (one line each, naming the flags)."""


@dataclass(kw_only=True)
class EvalOptions(RunOptions):
    """Prints one JSON object (val_loss, perplexity, squad_em, squad_f1: those that apply) and writes
    <run>/eval/scores.json and eval/squad_predictions.json (eval/base/ with --base). key.sub=value overrides change
    the run's recorded config for this evaluation, e.g. eval.squad.max_new_tokens=16."""
    COMMAND = "eval"
    SUMMARY = "score a finished run: loss, perplexity, SQuAD EM/F1, lm-eval tasks"
    overrides: list[str] = option("override the run's recorded config", factory=list, positional=True,
                                  metavar="key.sub=value")
    limit: Optional[int] = option("use only the first N examples of each set", None, metavar="N", at_least=1)
    dataset: Optional[str] = option("evaluate on this file instead of the run's validation sets (.json = SQuAD, "
                                    ".jsonl = input/output lines)", None, metavar="FILE")
    base: bool = option("evaluate the base model without the run's adapter", False)
    harness: Optional[str] = option("lm-evaluation-harness tasks: comma-separated names or task YAML files (needs "
                                    "the `eval` extra)", None, metavar="TASKS")
    harness_args: list[str] = option("arguments for lm_eval.simple_evaluate, e.g. num_fewshot=5 limit=100 "
                                     "batch_size=8", factory=list, nargs="+", metavar="key=value")
    batch_size: Optional[int] = option("examples per loss batch and questions per SQuAD generation batch (default: "
                                       "the run's train.micro_batch_size and eval.squad.batch_size; with --harness, "
                                       "lm-eval's batch_size)", None, metavar="N", at_least=1)

    def check(self) -> None:
        if self.harness_args and self.harness is None:
            raise UserError("eval: --harness-args needs --harness TASKS")
        if self.harness is not None and (self.dataset or self.overrides):
            raise UserError("eval: --harness runs lm-eval tasks; --dataset and overrides apply to the built-in "
                            "evaluation (run it separately)")


SAMPLING = ("temperature", "top_p", "top_k", "seed")  # the fields `tuneforge query` shares with generate


@dataclass(kw_only=True)
class GenerateOptions(RunOptions):
    """Generation with the run's base model and adapter (or full model): greedy, or sampling with
    --temperature/--top-p/--top-k/--seed; --input/--output for a whole jsonl file."""
    COMMAND = "generate"
    SUMMARY = "generate text with a finished run's model"
    prompt: Optional[list[str]] = option("prompt text (repeatable)", None, action="append", one_of="what")
    examples: Optional[int] = option("answer the first N validation examples of the run's recipe, beside their "
                                     "references", None, metavar="N", one_of="what")
    input: Optional[str] = option("batch prediction: one JSON object per line with `prompt`, or the fields of the "
                                  "run's prompt template, or `input`; needs --output", None, metavar="FILE.jsonl",
                                  one_of="what")
    output: Optional[str] = option("with --input: write one JSON line per input line, in order (the input fields + "
                                   "`output`)", None, metavar="FILE.jsonl")
    max_new_tokens: int = option("tokens to generate (default 32)", 32, at_least=1)
    batch_size: int = option("prompts per generation batch (default 16)", 16, at_least=1)
    temperature: float = option("0 = greedy (default); > 0 samples", 0.0)
    top_p: Optional[float] = option("nucleus sampling: keep the top-p probability mass", None)
    top_k: Optional[int] = option("sample among the k most likely tokens", None)
    seed: Optional[int] = option("seed for sampling (same seed = same samples)", None)
    stop_at_newline: bool = option("end each output at its first newline", False)
    base: bool = option("use the base model without the run's adapter", False)
    json: bool = option("print one JSON object per output", False)

    def check(self) -> None:
        if (self.input is None) != (self.output is None):
            raise UserError("generate: --input and --output go together")
        if sum(x is not None for x in (self.prompt, self.examples, self.input)) != 1:
            raise UserError("generate: one of --prompt, --examples and --input is required")
        if self.temperature < 0:
            raise UserError(f"--temperature: must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k: must be >= 1, got {self.top_k}")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise UserError("--top-p / --top-k apply to sampling: also pass --temperature > 0")


@dataclass(kw_only=True)
class ReportOptions(RunOptions):
    """Writes <run>/report.html (also written when training ends) and prints its path: loss, learning-rate,
    throughput and SQuAD plots, the config and the eval/ scores, in one file readable offline."""
    COMMAND = "report"
    SUMMARY = "write <run>/report.html (plots, config, scores; readable offline)"


@dataclass(kw_only=True)
class ExportOptions(RunOptions):
    """--format vllm: a merged HF model directory (LoRA merged into the base; a full fine-tune copied), or with
    --keep-adapter the adapter for vLLM's LoRA serving; prints the `vllm serve` command. --format gguf: one GGUF file
    for llama.cpp, Ollama and LM Studio (an adapter merged first), with its tokenizer and chat template; --ollama adds
    a Modelfile beside it. --format gguf-lora: the LoRA adapter alone, for llama.cpp's --lora. Prints the commands
    that run it."""
    COMMAND = "export"
    SUMMARY = "write the run's model for a serving engine (vLLM, llama.cpp, Ollama)"
    format: Literal["vllm", "gguf", "gguf-lora"] = option("target (default vllm)", "vllm")
    out: str = option("vllm: output directory (must not exist or be empty); gguf, gguf-lora: the .gguf file")
    quant: str = option("gguf: f16 (default), bf16, q8_0, q4_0 or f32; gguf-lora: f16, bf16 or f32", "f16")
    ollama: bool = option("gguf: also write a Modelfile (template, stop tokens, system prompt) beside the file", False)
    overwrite: bool = option("gguf: replace an existing file (kept whole until the new one is complete)", False)
    keep_adapter: bool = option("keep the LoRA adapter separate (vLLM --enable-lora)", False)

    def check(self) -> None:
        if self.format == "vllm" and (self.ollama or self.quant != "f16" or self.overwrite):
            raise UserError("--quant, --ollama and --overwrite go with --format gguf / gguf-lora")
        if self.format != "vllm" and self.keep_adapter:
            raise UserError("--keep-adapter goes with --format vllm; --format gguf-lora writes the adapter alone")


@dataclass(kw_only=True)
class PushOptions(RunOptions):
    """Uploads final/ and a generated README.md model card (base model, data, recipe, scores). Needs a token:
    `hf auth login` or HF_TOKEN."""
    COMMAND = "push"
    SUMMARY = "upload the run's final/ to the Hugging Face Hub with a model card"
    repo_id: str = option("Hub repository, e.g. me/my-model")
    private: bool = option("create the repository as private", False)


@dataclass(kw_only=True)
class MergeOptions(RunOptions):
    """Fold a run's LoRA / DoRA / rsLoRA or IA3 adapter into a full-precision copy of the base model (QLoRA runs
    too) and save it with the tokenizer, loadable with AutoModelForCausalLM (a seq2seq run:
    AutoModelForSeq2SeqLM).from_pretrained. Prompt methods and bottleneck adapters cannot be merged."""
    COMMAND = "merge"
    SUMMARY = "merge a run's adapter into the base weights (full HF model dir)"
    out: str = option("output directory for the merged model")
    dtype: Literal["float32", "bfloat16"] = option("dtype of the saved weights (default float32)", "float32")
    overwrite: bool = option("replace a non-empty --out directory", False)


LIMITS = "request limits (transformers engine; over them: a 4xx answer)"


@dataclass(kw_only=True)
class ServeOptions(RunOptions):
    """/v1/models, /v1/completions, /v1/chat/completions (streaming with "stream": true) and /health. --engine auto
    uses vLLM's server when vLLM and a GPU are there, else a transformers engine that batches concurrent requests.
    Needs the `serve` extra (pip install 'tuneforge[serve]')."""
    COMMAND = "serve"
    SUMMARY = "serve a finished run's model over an OpenAI-compatible HTTP API"
    run: str = option("run directory (runs/<name>); the model is named after the run")
    host: str = option("address to listen on (default 127.0.0.1: this machine only)", "127.0.0.1")
    port: int = option("port (default 8000; 0 picks a free one)", 8000)
    engine: Literal["auto", "vllm", "transformers"] = option(
        "auto (default): vLLM when installed with a GPU, else transformers", "auto")
    api_key: Optional[str] = option("require 'Authorization: Bearer KEY' (default: $TUNEFORGE_API_KEY; none: open)",
                                    None, env="TUNEFORGE_API_KEY")
    chat_template: Optional[str] = option("Jinja chat template for /v1/chat/completions (a file or the template "
                                          "itself; default: the run's data.chat_template, else the tokenizer's)",
                                          None, metavar="FILE")
    max_prompt_tokens: int = option("tokens per prompt (default 2048)", 2048, group=LIMITS)
    max_new_tokens: int = option("max_tokens per request (default 512)", 512, group=LIMITS)
    max_concurrent: int = option("requests in flight, and continuations per batch (default 64; more get 429)", 64,
                                 group=LIMITS)
    max_body_bytes: int = option("request body size (default 1 MiB)", 1 << 20, group=LIMITS)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port: must be in 0..65535, got {self.port}")


def flag(f: dataclasses.Field) -> str:
    return f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")


def _argparse_type(hint) -> dict:
    """type / choices / action for a field's annotation: bool is a switch, Literal a choice, Optional[X] is X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
        args = list(typing.get_args(hint))
    if hint is bool:
        return {"action": "store_true"}
    if typing.get_origin(hint) is Literal:
        return {"choices": list(args)}
    return {"type": hint} if hint in (int, float) else {}


def add_options(parser: argparse.ArgumentParser, options: type, names: tuple[str, ...] | None = None) -> None:
    """One argparse argument per field of `options` (or of those `names`), in field order: its flag, type, default,
    choices and help; required when the field has no default."""
    hints = typing.get_type_hints(options)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        kwargs = {"help": meta["help"], **_argparse_type(hints[f.name])}
        kwargs.update({k: meta[k] for k in ("metavar", "nargs", "action") if k in meta})
        if meta.get("positional"):
            kwargs.setdefault("nargs", "*")
        elif f.default is not REQUIRED or f.default_factory is not REQUIRED:
            kwargs["default"] = f.default if f.default_factory is REQUIRED else f.default_factory()
        else:
            kwargs["required"] = True
        group = f"one_of:{meta['one_of']}" if "one_of" in meta else meta.get("group")
        if group is not None and group not in groups:
            groups[group] = (parser.add_mutually_exclusive_group(required=True) if "one_of" in meta
                             else parser.add_argument_group(group))
        groups.get(group, parser).add_argument(flag(f), **kwargs)


def options_from(options: type, namespace: argparse.Namespace):
    """The options object of a parsed command line (checked on construction)."""
    return options(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(options)})
