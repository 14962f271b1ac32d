"""`tuneforge generate` over data files: --input (a jsonl file of inputs in, one jsonl line of output per input line
out, in the same order) and --examples (the run's own validation examples, answered beside their references), both
prompted the way the run trained; and --prompt."""
from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

from tuneforge.config.commands import GenerateOptions
from tuneforge.config.schema import Config, DataConfig
from tuneforge.data import as_sources, load_records, template_for
from tuneforge.data.pairs import read_pair_texts
from tuneforge.data.tokenize import _template_of, chat_prompts_for, render_prompt
from tuneforge.errors import UserError
from tuneforge.eval.generate import Sampling, generate
from tuneforge.files import read_user_text
from tuneforge.models.load import resolve_precision
from tuneforge.run.model import load_run_model


def load_for(opts: GenerateOptions):
    """(model, tokenizer, cfg, precision, sampling) of the run the options name."""
    model, tokenizer, cfg = load_run_model(opts.run, base=opts.base)
    sampling = Sampling(opts.temperature, opts.top_p, opts.top_k, opts.seed)
    return model, tokenizer, cfg, resolve_precision(cfg.model.dtype, model.device.type), sampling


def answer_prompts(opts: GenerateOptions) -> list[str]:
    """The run's continuation of each of opts.prompt (the Python API's generate)."""
    model, tokenizer, _, precision, sampling = load_for(opts)
    return generate(model, tokenizer, opts.prompt, opts.max_new_tokens, opts.batch_size, precision,
                    stop_at_newline=opts.stop_at_newline, sampling=sampling)


def generate_lines(opts: GenerateOptions) -> list[str]:
    """What `tuneforge generate` prints: an output per prompt, an answer per example beside its references (JSON
    objects with --json), or with --input the count of lines written to --output."""
    if opts.prompt:
        outputs = answer_prompts(opts)
        return [json.dumps({"prompt": p, "output": out}) if opts.json else out for p, out in zip(opts.prompt, outputs)]
    model, tokenizer, cfg, precision, sampling = load_for(opts)
    if opts.input:
        n = predict_file(model, tokenizer, cfg.data, opts.input, opts.output, opts.max_new_tokens, opts.batch_size,
                         precision, sampling, opts.stop_at_newline)
        return [f"wrote {n} outputs to {opts.output}"]
    answers = answer_examples(model, tokenizer, cfg, opts.examples, opts.max_new_tokens, opts.batch_size, precision)
    return [json.dumps(row) if opts.json else text for row, text in answers]


def answer_examples(model, tokenizer, cfg: Config, n: int, max_new_tokens: int, batch_size: int,
                    precision) -> list[tuple[dict, str]]:
    """The first n validation examples of the run's recipe (else of its training data), asked as it trained on them
    and answered greedily up to a newline: (a JSON object, a readable text) per example, beside its references."""
    source = (as_sources(cfg.data.validation) or as_sources(cfg.data.train))[0]
    if source.format == "chat":
        raise UserError("generate --examples: chat sources are not supported; pass --prompt")
    if source.format == "preference":
        return _answer_pairs(model, tokenizer, cfg.data, dataclasses.replace(source, limit=n), max_new_tokens,
                             batch_size, precision)
    records = load_records(source.path, source.format, n, columns=source.columns,
                           unanswerable=source.unanswerable, split=source.split)
    template = template_for(cfg.data, source)
    prompts = [render_prompt(_template_of(template, r), r, source.path) for r in records]
    chat = chat_prompts_for(cfg.data, tokenizer, source.path)  # asked the way the run trained (prompt_style)
    if chat is not None:
        prompts = [chat.render(tokenizer, p) for p in prompts]
    outputs = generate_mixed(model, tokenizer, [(p, chat is not None) for p in prompts], max_new_tokens, batch_size,
                             precision, None, stop_at_newline=True)
    out = []
    for record, answer in zip(records, outputs):
        question = record.fields.get("question") or record.fields.get("input", "")
        references = " | ".join(record.references[:3])
        out.append(({"id": record.id, "output": answer, "references": record.references},
                    f"Q: {question.strip()}\n   reference: {references}\n   tuneforge: {answer}"))
    return out


def _answer_pairs(model, tokenizer, data: DataConfig, source, max_new_tokens: int, batch_size: int,
                  precision) -> list[tuple[dict, str]]:
    """A preference run's held-out prompts, asked as it trained on them, beside their chosen and rejected answers."""
    texts = read_pair_texts(source, data, tokenizer)
    outputs = generate_mixed(model, tokenizer, [(t.prompt, t.chat) for t in texts], max_new_tokens, batch_size,
                             precision, None, stop_at_newline=True)
    eos = tokenizer.eos_token or "\0"
    out = []
    for t, answer in zip(texts, outputs):
        chosen, rejected = (text.split(eos)[0].strip() for text in (t.chosen, t.rejected))
        out.append(({"where": t.where, "output": answer, "chosen": chosen, "rejected": rejected},
                    f"{t.where}\n   chosen: {chosen}\n   rejected: {rejected}\n   tuneforge: {answer}"))
    return out


def generate_mixed(model, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, batch_size: int,
                   precision, sampling: Sampling | None, stop_at_newline: bool) -> list[str]:
    """Outputs in prompt order for (prompt, chat-rendered?) pairs. A chat-rendered prompt already holds the
    template's bos: the tokenizer adds none to it (it would double), so the two kinds go in separate batches."""
    outputs = [""] * len(prompts)
    for rendered in (False, True):
        picked = [i for i, (_, chat) in enumerate(prompts) if chat is rendered]
        if picked:
            texts = generate(model, tokenizer, [prompts[i][0] for i in picked], max_new_tokens, batch_size, precision,
                             stop_at_newline=stop_at_newline, sampling=sampling, add_special_tokens=not rendered)
            for i, text in zip(picked, texts):
                outputs[i] = text
    return outputs


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


def predict_file(model, tokenizer, data: DataConfig, input_path: str, output_path: str, max_new_tokens: int,
                 batch_size: int, precision, sampling: Sampling, stop_at_newline: bool) -> int:
    """Each output line is its input object plus `output` (an input `output` field, e.g. a reference, is kept
    as `reference`)."""
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    source = as_sources(data.train)[0]  # several training sources: the prompts follow the first one's template
    rows = read_prompts(input_path, template_for(data, source),
                        chat_prompts_for(data, tokenizer, source.path), tokenizer)
    outputs = generate_mixed(model, tokenizer, [(prompt, chat) for _, prompt, chat in rows], max_new_tokens,
                             batch_size, precision, sampling, stop_at_newline)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for (row, _, _), text in zip(rows, outputs):
            if "output" in row:
                row = {**{k: v for k, v in row.items() if k != "output"}, "reference": row["output"]}
            f.write(json.dumps({**row, "output": text}, ensure_ascii=False) + "\n")
    return len(rows)
