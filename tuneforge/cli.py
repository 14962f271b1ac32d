"""The `tuneforge` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tuneforge import __version__
from tuneforge.config.commands import (SAMPLING, EvalOptions, ExportOptions, GenerateOptions, MergeOptions,
                                       PushOptions, ReportOptions, RunOptions, ServeOptions, add_options,
                                       options_from)
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

    add_command(sub, GenerateOptions)

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

    for options in (MergeOptions, EvalOptions, ReportOptions, ExportOptions, PushOptions, ServeOptions):
        add_command(sub, options)
    add_query_command(sub)
    return parser


def add_recipe_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-c", "--config", required=required, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")


def add_command(sub, options: type[RunOptions]) -> None:
    """A subcommand whose arguments are generated from its options dataclass (tuneforge/config/commands.py)."""
    parser = sub.add_parser(options.COMMAND, help=options.SUMMARY, description=options.__doc__)
    add_options(parser, options)
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(options=options)


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (tuneforge starts torchrun itself)")
    group.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="processes (GPUs) on this node")
    group.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes")
    group.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank (multi-node)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address (multi-node)")


def add_query_command(sub) -> None:
    q = sub.add_parser("query", help="send a prompt to an OpenAI-compatible server and print the answer",
                       description="A small client for `tuneforge serve` (or vLLM): completes --prompt, or with "
                                   "--chat sends it as a user message. The model defaults to the one the server "
                                   "lists.")
    q.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    q.add_argument("--prompt", required=True, help="prompt text")
    q.add_argument("--chat", action="store_true", help="use /v1/chat/completions (the prompt is the user message)")
    q.add_argument("--model", help="model name (default: the server's)")
    q.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    add_options(q, GenerateOptions, SAMPLING)
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


def cmd_generate(opts: GenerateOptions) -> int:
    from tuneforge.eval.batch import generate_lines

    for line in generate_lines(opts):
        print(line)
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


def cmd_merge(opts: MergeOptions) -> int:
    from tuneforge.run.merge import merge_run

    out = merge_run(opts.run, opts.out, opts.dtype, opts.overwrite)
    print(f"merged model written to {out}")
    return 0


def cmd_eval(opts: EvalOptions) -> int:
    from tuneforge.eval.evaluate import evaluate_run

    print(json.dumps(evaluate_run(opts)))
    return 0


def cmd_report(opts: ReportOptions) -> int:
    from tuneforge.report import write_report

    print(write_report(opts.run))
    return 0


def cmd_export(opts: ExportOptions) -> int:
    from tuneforge.export import export_gguf, export_vllm

    if opts.format == "vllm":
        print(export_vllm(opts.run, opts.out, keep_adapter=opts.keep_adapter))
    else:
        print(export_gguf(opts.run, opts.out, quant=opts.quant, overwrite=opts.overwrite, ollama=opts.ollama,
                          lora=opts.format == "gguf-lora"))
    return 0


def cmd_push(opts: PushOptions) -> int:
    from tuneforge.hub import push_run

    print(push_run(opts.run, opts.repo_id, private=opts.private))
    return 0


def cmd_serve(opts: ServeOptions) -> int:
    from tuneforge.serve import Limits, serve_run

    limits = Limits(opts.max_prompt_tokens, opts.max_new_tokens, opts.max_concurrent, opts.max_body_bytes)
    return serve_run(opts.run, opts.host, opts.port, opts.engine, opts.api_key, limits, opts.chat_template)


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
    print(write_slurm_script(cfg.run, args))
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
        options = getattr(args, "options", None)  # a command of config/commands.py gets its checked options
        return COMMANDS[args.command](options_from(options, args) if options else args)
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
