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
  tuneforge generate --run runs/quickstart --input prompts.jsonl --output answers.jsonl --temperature 0.7 --seed 1
  tuneforge eval --run runs/quickstart            # val loss, perplexity, SQuAD EM/F1; --base for the base model
  tuneforge eval --run runs/quickstart --harness hellaswag --harness-args num_fewshot=0 limit=100
  tuneforge report --run runs/quickstart          # runs/quickstart/report.html
  tuneforge export --run runs/quickstart --format vllm --out exported/quickstart
  tuneforge push --run runs/quickstart --repo-id me/quickstart-lora --private"""


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
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top-p probability mass")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed = same samples)")
    gen.add_argument("--stop-at-newline", action="store_true", help="end each output at its first newline")
    gen.add_argument("--base", action="store_true", help="use the base model without the run's adapter")
    gen.add_argument("--json", action="store_true", help="print one JSON object per output")
    gen.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    add_eval_commands(sub)
    return parser


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

    ex = sub.add_parser("export", help="write the run's model for a serving engine",
                        description="--format vllm: a merged HF model directory (LoRA merged into the base; a full "
                                    "fine-tune copied), or with --keep-adapter the adapter for vLLM's LoRA serving. "
                                    "Prints the `vllm serve` command.")
    ex.add_argument("--run", required=True, help="run directory (runs/<name>)")
    ex.add_argument("--format", choices=["vllm"], default="vllm", help="target (default vllm)")
    ex.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ex.add_argument("--keep-adapter", action="store_true", help="keep the LoRA adapter separate (vLLM --enable-lora)")
    ex.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    push = sub.add_parser("push", help="upload the run's final/ to the Hugging Face Hub with a model card",
                          description="Uploads final/ and a generated README.md model card (base model, data, "
                                      "recipe, scores). Needs a token: `hf auth login` or HF_TOKEN.")
    push.add_argument("--run", required=True, help="run directory (runs/<name>)")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/my-model")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


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
    if (args.input is None) != (args.output is None):
        raise UserError("generate: --input and --output go together")
    from tuneforge.eval import generate, load_run_model
    from tuneforge.eval.batch import sampling_from_args
    from tuneforge.models import resolve_precision

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
    from tuneforge.export import export_vllm

    print(export_vllm(args.run, args.out, keep_adapter=args.keep_adapter))
    return 0


def cmd_push(args) -> int:
    from tuneforge.hub import push_run

    print(push_run(args.run, args.repo_id, private=args.private))
    return 0


def quiet_libraries() -> None:
    """Library chatter that says nothing to a tuneforge user (deprecations inside transformers/torchdata)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "eval": cmd_eval, "report": cmd_report,
            "export": cmd_export, "push": cmd_push}


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
