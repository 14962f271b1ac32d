"""Batch prediction: a jsonl file of inputs in, one jsonl line of output per input line out, in the same order."""
from __future__ import annotations

import json
import string
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.data import as_sources, template_for
from tuneforge.data.tokenize import chat_prompts_for
from tuneforge.errors import UserError
from tuneforge.eval.generate import Sampling, generate
from tuneforge.files import read_user_text


def sampling_from_args(args) -> Sampling:
    if args.temperature < 0:
        raise UserError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1, got {args.top_k}")
    if args.temperature == 0 and (args.top_p is not None or args.top_k is not None):
        raise UserError("--top-p / --top-k apply to sampling: also pass --temperature > 0")
    return Sampling(args.temperature, args.top_p, args.top_k, args.seed)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def prompt_of(row: dict, template: str, fields: list[str], where: str, chat=None, tokenizer=None) -> tuple[str, bool]:
    """(prompt, whether it is chat-rendered): `prompt` as given; else the run's template filled from the line's
    fields, asked the way the run trained (through the chat template for data.prompt_style chat); else `input` as
    given."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"], False
    if fields and all(isinstance(row.get(f), str) for f in fields):
        filled = template.format(**{f: row[f] for f in fields})
        return (filled, False) if chat is None else (chat.render(tokenizer, filled), True)
    if isinstance(row.get("input"), str):
        return row["input"], False
    raise UserError(f"{where}: expected a string field 'prompt', or the template fields "
                    f"({', '.join(fields) or 'none'}), or 'input'")


def read_prompts(path: str, template: str, chat=None, tokenizer=None) -> list[tuple[dict, str, bool]]:
    text = read_user_text(path, f"--input {path}")
    fields = template_fields(template)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines carry no input, so they get no output line
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((row, *prompt_of(row, template, fields, f"{path}:{lineno}", chat, tokenizer)))
    if not rows:
        raise UserError(f"--input {path}: no input lines")
    return rows


def predict_file(model, tokenizer, cfg: Config, input_path: str, output_path: str, max_new_tokens: int,
                 batch_size: int, precision, sampling: Sampling, stop_at_newline: bool) -> int:
    """Each output line is its input object plus `output` (an input `output` field, e.g. a reference, is kept
    as `reference`)."""
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    source = as_sources(cfg.data.train)[0]  # several training sources: the prompts follow the first one's template
    rows = read_prompts(input_path, template_for(cfg.data, source),
                        chat_prompts_for(cfg.data, tokenizer, source.path), tokenizer)
    # A chat-rendered prompt already holds the template's bos: the tokenizer adds none to it (it would double).
    outputs = [""] * len(rows)
    for rendered in (False, True):
        picked = [i for i, (_, _, chat) in enumerate(rows) if chat is rendered]
        if picked:
            texts = generate(model, tokenizer, [rows[i][1] for i in picked], max_new_tokens, batch_size, precision,
                             stop_at_newline=stop_at_newline, sampling=sampling, add_special_tokens=not rendered)
            for i, text in zip(picked, texts):
                outputs[i] = text
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for (row, _, _), text in zip(rows, outputs):
            if "output" in row:
                row = {**{k: v for k, v in row.items() if k != "output"}, "reference": row["output"]}
            f.write(json.dumps({**row, "output": text}, ensure_ascii=False) + "\n")
    return len(rows)
