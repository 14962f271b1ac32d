"""The `tuneforge` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tuneforge import __version__
from tuneforge.errors import UserError

EPILOG = """examples:
  tuneforge finetune -c recipes/quickstart.yaml
  tuneforge finetune -c recipes/quickstart.yaml train.max_steps=50 model.name_or_path=Qwen/Qwen2.5-0.5B
  tuneforge generate --run runs/quickstart --prompt "Context: ... Question: ... Answer:"
  tuneforge generate --run runs/quickstart --examples 5
  tuneforge prepare-data -c recipes/quickstart.yaml --out formatted.jsonl
  tuneforge merge --run runs/quickstart --out merged/quickstart
  tuneforge generate --run runs/quickstart --input prompts.jsonl --output answers.jsonl --temperature 0.7 --seed 1
  tuneforge eval --run runs/quickstart            # val loss, perplexity, SQuAD EM/F1; --base for the base model
  tuneforge eval --run runs/quickstart --harness hellaswag --harness-args num_fewshot=0 limit=100
  tuneforge report --run runs/quickstart          # runs/quickstart/report.html
  tuneforge export --run runs/quickstart --format vllm --out exported/quickstart
  tuneforge push --run runs/quickstart --repo-id me/quickstart-lora --private
  tuneforge serve --run runs/quickstart --port 8000    # OpenAI-compatible API at http://127.0.0.1:8000/v1
  tuneforge query --url http://127.0.0.1:8000 --prompt "Once upon a time" --max-tokens 32"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other tuneforge error (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"tuneforge: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tuneforge", description="Fine-tune Hugging Face language models "
                                     "(causal or encoder-decoder) and classifiers from one YAML recipe, "
                                     "then evaluate, export and serve them.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ft = sub.add_parser("finetune", help="train a model from a recipe",
                        description="Train from a YAML recipe; key.sub=value overrides follow the config, "
                                    "e.g. train.max_steps=100 peft=null. `--help-config` lists every key.")
    add_recipe_args(ft, required=False)
    ft.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ft.add_argument("--help-config", action="store_true", help="list every recipe key with its help and default")
    add_launch_args(ft)
    ft.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sl = sub.add_parser("slurm", help="write an sbatch script that runs a recipe on several nodes",
                        description="Writes <run dir>/slurm.sbatch (or --out) and prints its path, so "
                                    "`sbatch $(tuneforge slurm -c FILE --nodes 4 --gpus-per-node 8)` submits it. "
                                    "The job requeues itself when preempted and resumes from its newest checkpoint.")
    add_recipe_args(sl)
    sl.add_argument("--nodes", type=int, required=True, help="number of nodes")
    sl.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (training processes) per node")
    sl.add_argument("--partition", help="Slurm partition")
    sl.add_argument("--time", help="time limit, e.g. 24:00:00")
    sl.add_argument("--account", help="Slurm account")
    sl.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores per GPU (default 8)")
    sl.add_argument("--out", help="where to write the script (default <run dir>/slurm.sbatch)")
    sl.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    gen = sub.add_parser("generate", help="generate text with a finished run's model",
                         description="Generation with the run's base model and adapter (or full model): greedy, or "
                                     "sampling with --temperature/--top-p/--top-k/--seed; --input/--output for a "
                                     "whole jsonl file.")
    gen.add_argument("--run", required=True, help="run directory (runs/<name>)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    what.add_argument("--examples", type=int, metavar="N",
                      help="answer the first N validation examples of the run's recipe, beside their references")
    what.add_argument("--input", metavar="FILE.jsonl",
                      help="batch prediction: one JSON object per line with `prompt`, or the fields of the run's "
                           "prompt template, or `input`; needs --output")
    gen.add_argument("--output", metavar="FILE.jsonl",
                     help="with --input: write one JSON line per input line, in order (the input fields + `output`)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    add_sampling_args(gen)
    gen.add_argument("--stop-at-newline", action="store_true", help="end each output at its first newline")
    gen.add_argument("--base", action="store_true", help="use the base model without the run's adapter")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    prep = sub.add_parser("prepare-data", help="show what training will see (counts, lengths, masking) and cache it",
                          description="Read, render and tokenize a recipe's data exactly as `finetune` does (and fill "
                                      "the tokenization cache): record counts per source, tokens, truncated and "
                                      "dropped examples with reasons, a length histogram, padding waste or packing "
                                      "efficiency, and one rendered example with its trained-on span marked.")
    add_recipe_args(prep)
    prep.add_argument("--out", metavar="FILE.jsonl", help="also write the formatted input/output records as jsonl")
    prep.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    pl = sub.add_parser("plan", help="estimate a recipe's peak memory and step time before training",
                        description="Peak memory per process (weights, gradients, optimizer state, activations traced "
                                    "on fake tensors, loss, runtime), with and without activation checkpointing and "
                                    "sharding, whether it fits this machine, a suggested micro batch and a step "
                                    "time estimate. Reads only the model's config: no weights are loaded.")
    add_recipe_args(pl)
    pl.add_argument("--nproc", type=int, default=1, metavar="N", help="training processes in all (default 1)")
    pl.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: cuda when present)")
    pl.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    mg = sub.add_parser("merge", help="merge a run's adapter into the base weights (full HF model dir)",
                        description="Fold a run's LoRA / DoRA / rsLoRA or IA3 adapter into a full-precision copy "
                                    "of the base model (QLoRA runs too) and save it with the tokenizer, loadable "
                                    "with AutoModelForCausalLM (a seq2seq run: AutoModelForSeq2SeqLM)"
                                    ".from_pretrained. Prompt methods and bottleneck "
                                    "adapters cannot be merged.")
    mg.add_argument("--run", required=True, help="run directory (runs/<name>)")
    mg.add_argument("--out", required=True, help="output directory for the merged model")
    mg.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the saved weights (default float32)")
    mg.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    mg.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    add_eval_commands(sub)
    return parser


def add_recipe_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-c", "--config", required=required, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top-p probability mass")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed = same samples)")


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (tuneforge starts torchrun itself)")
    group.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="processes (GPUs) on this node")
    group.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes")
    group.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank (multi-node)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address (multi-node)")


def add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="score a finished run: loss, perplexity, SQuAD EM/F1, lm-eval tasks",
                        description="Prints one JSON object (val_loss, perplexity, squad_em, squad_f1: those that "
                                    "apply) and writes <run>/eval/scores.json and eval/squad_predictions.json "
                                    "(eval/base/ with --base). key.sub=value overrides change the run's recorded "
                                    "config for this evaluation, e.g. eval.squad.max_new_tokens=16.")
    ev.add_argument("--run", required=True, help="run directory (runs/<name>)")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override the run's recorded config")
    ev.add_argument("--limit", type=int, metavar="N", help="use only the first N examples of each set")
    ev.add_argument("--dataset", metavar="FILE", help="evaluate on this file instead of the run's validation sets "
                                                      "(.json = SQuAD, .jsonl = input/output lines)")
    ev.add_argument("--base", action="store_true", help="evaluate the base model without the run's adapter")
    ev.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks: comma-separated names or "
                                                       "task YAML files (needs the `eval` extra)")
    ev.add_argument("--harness-args", nargs="+", default=[], metavar="key=value",
                    help="arguments for lm_eval.simple_evaluate, e.g. num_fewshot=5 limit=100 batch_size=8")
    ev.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    rep = sub.add_parser("report", help="write <run>/report.html (plots, config, scores; readable offline)")
    rep.add_argument("--run", required=True, help="run directory (runs/<name>)")
    rep.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    ex = sub.add_parser("export", help="write the run's model for a serving engine (vLLM, llama.cpp, Ollama)",
                        description="--format vllm: a merged HF model directory (LoRA merged into the base; a full "
                                    "fine-tune copied), or with --keep-adapter the adapter for vLLM's LoRA serving; "
                                    "prints the `vllm serve` command. --format gguf: one GGUF file for llama.cpp, "
                                    "Ollama and LM Studio (an adapter merged first), with its tokenizer and chat "
                                    "template; --ollama adds a Modelfile beside it. --format gguf-lora: the LoRA "
                                    "adapter alone, for llama.cpp's --lora. Prints the commands that run it.")
    ex.add_argument("--run", required=True, help="run directory (runs/<name>)")
    ex.add_argument("--format", choices=["vllm", "gguf", "gguf-lora"], default="vllm", help="target (default vllm)")
    ex.add_argument("--out", required=True, help="vllm: output directory (must not exist or be empty); gguf, "
                                                 "gguf-lora: the .gguf file")
    ex.add_argument("--quant", default="f16", help="gguf: f16 (default), bf16, q8_0, q4_0 or f32; gguf-lora: f16, bf16 "
                                                   "or f32")
    ex.add_argument("--ollama", action="store_true", help="gguf: also write a Modelfile (template, stop tokens, "
                                                          "system prompt) beside the file")
    ex.add_argument("--overwrite", action="store_true", help="gguf: replace an existing file (kept whole until the "
                                                             "new one is complete)")
    ex.add_argument("--keep-adapter", action="store_true", help="keep the LoRA adapter separate (vLLM --enable-lora)")
    ex.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    push = sub.add_parser("push", help="upload the run's final/ to the Hugging Face Hub with a model card",
                          description="Uploads final/ and a generated README.md model card (base model, data, "
                                      "recipe, scores). Needs a token: `hf auth login` or HF_TOKEN.")
    push.add_argument("--run", required=True, help="run directory (runs/<name>)")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/my-model")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    add_serve_commands(sub)


def add_serve_commands(sub) -> None:
    sv = sub.add_parser("serve", help="serve a finished run's model over an OpenAI-compatible HTTP API",
                        description="/v1/models, /v1/completions, /v1/chat/completions (streaming with \"stream\": "
                                    "true) and /health. --engine auto uses vLLM's server when vLLM and a GPU are "
                                    "there, else a transformers engine that batches concurrent requests. Needs the "
                                    "`serve` extra (pip install 'tuneforge[serve]').")
    sv.add_argument("--run", required=True, help="run directory (runs/<name>); the model is named after the run")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                    help="auto (default): vLLM when installed with a GPU, else transformers")
    sv.add_argument("--api-key", default=os.environ.get("TUNEFORGE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $TUNEFORGE_API_KEY; none: open)")
    sv.add_argument("--chat-template", metavar="FILE",
                    help="Jinja chat template for /v1/chat/completions (a file or the template itself; default: "
                         "the run's data.chat_template, else the tokenizer's)")
    limits = sv.add_argument_group("request limits (transformers engine; over them: a 4xx answer)")
    limits.add_argument("--max-prompt-tokens", type=int, default=2048, help="tokens per prompt (default 2048)")
    limits.add_argument("--max-new-tokens", type=int, default=512, help="max_tokens per request (default 512)")
    limits.add_argument("--max-concurrent", type=int, default=64,
                        help="requests in flight, and continuations per batch (default 64; more get 429)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)")
    sv.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    q = sub.add_parser("query", help="send a prompt to an OpenAI-compatible server and print the answer",
                       description="A small client for `tuneforge serve` (or vLLM): completes --prompt, or with "
                                   "--chat sends it as a user message. The model defaults to the one the server "
                                   "lists.")
    q.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    q.add_argument("--prompt", required=True, help="prompt text")
    q.add_argument("--chat", action="store_true", help="use /v1/chat/completions (the prompt is the user message)")
    q.add_argument("--model", help="model name (default: the server's)")
    q.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    add_sampling_args(q)
    q.add_argument("--stop", action="append", help="stop string (repeatable)")
    q.add_argument("--stream", action="store_true", help="print the text as it is generated")
    q.add_argument("--api-key", default=os.environ.get("TUNEFORGE_API_KEY"),
                   help="bearer key (default: $TUNEFORGE_API_KEY)")
    q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_finetune(args) -> int:
    from tuneforge.config import describe_schema, load_config
    from tuneforge.distributed import launched_world_size

    if args.help_config:
        print("\n".join(describe_schema()))
        return 0
    if not args.config:
        raise UserError("finetune: -c/--config FILE is required")
    if (args.nproc_per_node > 1 or args.nnodes > 1) and "TORCHELASTIC_RUN_ID" not in os.environ:
        from tuneforge.launch import launch_torchrun

        return launch_torchrun(args)  # checks the recipe once, here, before torchrun starts the ranks
    cfg = load_config(args.config, args.overrides, world_size=launched_world_size())
    from tuneforge.train import finetune

    finetune(cfg, overwrite=args.overwrite)
    return 0


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if (args.input is None) != (args.output is None):
        raise UserError("generate: --input and --output go together")
    from tuneforge.eval.batch import sampling_from_args
    from tuneforge.eval.generate import generate
    from tuneforge.models.load import resolve_precision
    from tuneforge.run.model import load_run_model

    sampling = sampling_from_args(args)
    model, tokenizer, cfg = load_run_model(args.run, base=args.base)
    precision = resolve_precision(cfg.model.dtype, str(model.device.type))
    if args.input:
        from tuneforge.eval.batch import predict_file

        n = predict_file(model, tokenizer, cfg, args.input, args.output, args.max_new_tokens, args.batch_size,
                         precision, sampling, args.stop_at_newline)
        print(f"wrote {n} outputs to {args.output}")
        return 0
    if args.prompt:
        outputs = generate(model, tokenizer, args.prompt, args.max_new_tokens, precision=precision,
                           sampling=sampling, stop_at_newline=args.stop_at_newline)
        for prompt, out in zip(args.prompt, outputs):
            print(json.dumps({"prompt": prompt, "output": out}) if args.json else out)
        return 0
    from tuneforge.data import as_sources, load_records, template_for
    from tuneforge.data.tokenize import _template_of, chat_prompts_for, render_prompt

    source = (as_sources(cfg.data.validation) or as_sources(cfg.data.train))[0]
    if source.format == "chat":
        raise UserError("generate --examples: chat sources are not supported; pass --prompt")
    if source.format == "preference":
        return _generate_pair_examples(args, model, tokenizer, cfg, source, precision)
    records = load_records(source.path, source.format, args.examples, columns=source.columns,
                           unanswerable=source.unanswerable, split=source.split)
    template = template_for(cfg.data, source)
    prompts = [render_prompt(_template_of(template, r), r, source.path) for r in records]
    chat = chat_prompts_for(cfg.data, tokenizer, source.path)  # asked the way the run trained (prompt_style)
    if chat is not None:
        prompts = [chat.render(tokenizer, p) for p in prompts]
    outputs = generate(model, tokenizer, prompts, args.max_new_tokens, precision=precision, stop_at_newline=True,
                       add_special_tokens=chat is None)
    for record, out in zip(records, outputs):
        if args.json:
            print(json.dumps({"id": record.id, "output": out, "references": record.references}))
            continue
        question = record.fields.get("question") or record.fields.get("input", "")
        print(f"Q: {question.strip()}\n   reference: {' | '.join(record.references[:3])}\n   tuneforge: {out}")
    return 0


def _generate_pair_examples(args, model, tokenizer, cfg, source, precision) -> int:
    """A preference run's held-out prompts, asked as it trained on them, beside their chosen and rejected answers."""
    import dataclasses

    from tuneforge.data.pairs import read_pair_texts
    from tuneforge.eval.generate import generate

    texts = read_pair_texts(dataclasses.replace(source, limit=args.examples), cfg.data, tokenizer)
    outputs = {}
    for chat in (False, True):  # rendered chat prompts carry their own special tokens
        group = [i for i, t in enumerate(texts) if t.chat == chat]
        answers = generate(model, tokenizer, [texts[i].prompt for i in group], args.max_new_tokens,
                           precision=precision, stop_at_newline=True, add_special_tokens=not chat) if group else []
        outputs.update(zip(group, answers))
    outputs = [outputs[i] for i in range(len(texts))]
    eos = tokenizer.eos_token or "\0"
    for t, out in zip(texts, outputs):
        chosen, rejected = (text.split(eos)[0].strip() for text in (t.chosen, t.rejected))
        if args.json:
            print(json.dumps({"where": t.where, "output": out, "chosen": chosen, "rejected": rejected}))
        else:
            print(f"{t.where}\n   chosen: {chosen}\n   rejected: {rejected}\n   tuneforge: {out}")
    return 0


def cmd_prepare_data(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.data.summary import print_data_report
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.gguf import resolve_model_source

    cfg = resolve_model_source(load_config(args.config, args.overrides))
    print_data_report(cfg, load_tokenizer(cfg.model), args.out)
    return 0


def cmd_plan(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.plan import plan

    if args.nproc < 1:
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    cfg = resolve_model_source(load_config(args.config, args.overrides, world_size=args.nproc))
    print(plan(cfg, args.nproc, args.device))
    return 0


def cmd_merge(args) -> int:
    from tuneforge.run.merge import merge_run

    out = merge_run(args.run, args.out, args.dtype, args.overwrite)
    print(f"merged model written to {out}")
    return 0


def cmd_eval(args) -> int:
    if args.harness_args and args.harness is None:
        raise UserError("eval: --harness-args needs --harness TASKS")
    if args.harness is not None:
        if args.dataset or args.overrides:
            raise UserError("eval: --harness runs lm-eval tasks; --dataset and overrides apply to the built-in "
                            "evaluation (run it separately)")
        from tuneforge.eval.harness import run_harness

        results = {"model": "base" if args.base else "final",
                   "harness": run_harness(args.run, args.harness, args.harness_args, base=args.base,
                                          limit=args.limit)}
    else:
        from tuneforge.eval.evaluate import evaluate_run

        results = evaluate_run(args.run, base=args.base, limit=args.limit, dataset=args.dataset,
                               overrides=args.overrides)
    print(json.dumps(results))
    return 0


def cmd_report(args) -> int:
    from tuneforge.report import write_report

    print(write_report(args.run))
    return 0


def cmd_export(args) -> int:
    from tuneforge.export import export_gguf, export_vllm

    if args.format == "vllm":
        if args.ollama or args.quant != "f16" or args.overwrite:
            raise UserError("--quant, --ollama and --overwrite go with --format gguf / gguf-lora")
        print(export_vllm(args.run, args.out, keep_adapter=args.keep_adapter))
        return 0
    if args.keep_adapter:
        raise UserError("--keep-adapter goes with --format vllm; --format gguf-lora writes the adapter alone")
    print(export_gguf(args.run, args.out, quant=args.quant, overwrite=args.overwrite, ollama=args.ollama,
                      lora=args.format == "gguf-lora"))
    return 0


def cmd_push(args) -> int:
    from tuneforge.hub import push_run

    print(push_run(args.run, args.repo_id, private=args.private))
    return 0


def cmd_serve(args) -> int:
    from tuneforge.serve import Limits, serve_run

    limits = Limits(args.max_prompt_tokens, args.max_new_tokens, args.max_concurrent, args.max_body_bytes)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: must be in 0..65535, got {args.port}")
    return serve_run(args.run, args.host, args.port, args.engine, args.api_key, limits, args.chat_template)


def cmd_query(args) -> int:
    from tuneforge.serve.client import query

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    pieces = query(args.url, args.prompt, chat=args.chat, model=args.model, api_key=args.api_key,
                   stream=args.stream, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def quiet_libraries() -> None:
    """Library chatter that says nothing to a tuneforge user (deprecations inside transformers/torchdata)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cmd_slurm(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.launch import write_slurm_script

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be >= 1")
    cfg = load_config(args.config, args.overrides, world_size=args.nodes * args.gpus_per_node)
    print(write_slurm_script(cfg, args))
    return 0


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "slurm": cmd_slurm, "prepare-data": cmd_prepare_data,
            "plan": cmd_plan, "merge": cmd_merge, "eval": cmd_eval, "report": cmd_report, "export": cmd_export,
            "push": cmd_push, "serve": cmd_serve, "query": cmd_query}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`-c F --overwrite a.b=1`): argparse stops a positional list at
    # the first option, so collect key=value words it left over.
    args, rest = parser.parse_known_args(argv)
    stray = [w for w in rest if "=" not in w or w.startswith("-")]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="tuneforge: %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"tuneforge: error: {rank}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"tuneforge: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
