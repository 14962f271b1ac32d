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
  tuneforge merge --run runs/quickstart --out merged/quickstart"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune Hugging Face causal language models "
                                     "from one YAML recipe.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ft = sub.add_parser("finetune", help="train a model from a recipe",
                        description="Train from a YAML recipe; key.sub=value overrides follow the config, "
                                    "e.g. train.max_steps=100 peft=null. `--help-config` lists every key.")
    ft.add_argument("-c", "--config", help="recipe YAML file")
    ft.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ft.add_argument("--help-config", action="store_true", help="list every recipe key with its help and default")
    ft.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    gen = sub.add_parser("generate", help="generate text with a finished run's model",
                         description="Greedy generation with the run's base model and adapter (or full model).")
    gen.add_argument("--run", required=True, help="run directory (runs/<name>)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    what.add_argument("--examples", type=int, metavar="N",
                      help="answer the first N validation examples of the run's recipe, beside their references")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--base", action="store_true", help="use the base model without the run's adapter")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    mg = sub.add_parser("merge", help="merge a run's adapter into the base weights (full HF model dir)",
                        description="Fold a run's LoRA / DoRA / rsLoRA or IA3 adapter into a full-precision copy "
                                    "of the base model (QLoRA runs too) and save it with the tokenizer, loadable "
                                    "with AutoModelForCausalLM.from_pretrained. Prompt methods and bottleneck "
                                    "adapters cannot be merged.")
    mg.add_argument("--run", required=True, help="run directory (runs/<name>)")
    mg.add_argument("--out", required=True, help="output directory for the merged model")
    mg.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the saved weights (default float32)")
    mg.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    mg.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_finetune(args) -> int:
    from tuneforge.config import describe_schema, load_config

    if args.help_config:
        print("\n".join(describe_schema()))
        return 0
    if not args.config:
        raise UserError("finetune: -c/--config FILE is required")
    cfg = load_config(args.config, args.overrides)
    from tuneforge.train import finetune

    finetune(cfg, overwrite=args.overwrite)
    return 0


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    from tuneforge.eval import generate, load_run_model
    from tuneforge.models import resolve_precision

    model, tokenizer, cfg = load_run_model(args.run, base=args.base)
    precision = resolve_precision(cfg.model.dtype, str(model.device.type))
    if args.prompt:
        outputs = generate(model, tokenizer, args.prompt, args.max_new_tokens, precision=precision)
        for prompt, out in zip(args.prompt, outputs):
            print(json.dumps({"prompt": prompt, "output": out}) if args.json else out)
        return 0
    from tuneforge.data import load_records, template_for
    from tuneforge.data.tokenize import render_prompt

    source = cfg.data.validation or cfg.data.train
    records = load_records(source.path, source.format, args.examples)
    template = template_for(cfg.data, source)
    prompts = [render_prompt(template, r, source.path) for r in records]
    outputs = generate(model, tokenizer, prompts, args.max_new_tokens, precision=precision, stop_at_newline=True)
    for record, out in zip(records, outputs):
        if args.json:
            print(json.dumps({"id": record.id, "output": out, "references": record.references}))
            continue
        question = record.fields.get("question") or record.fields.get("input", "")
        print(f"Q: {question.strip()}\n   reference: {' | '.join(record.references[:3])}\n   tuneforge: {out}")
    return 0


def cmd_merge(args) -> int:
    from tuneforge.peft.merge import merge_run

    out = merge_run(args.run, args.out, args.dtype, args.overwrite)
    print(f"merged model written to {out}")
    return 0


def quiet_libraries() -> None:
    """Library chatter that says nothing to a tuneforge user (deprecations inside transformers/torchdata)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"tuneforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
