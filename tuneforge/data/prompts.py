"""Prompts for online RL (the rl section): what the policy samples completions of, with the record's other fields
kept for the reward functions.

Any source the SFT data takes gives prompts: squad, input_output, alpaca and dolly through their prompt template
(with data.prompt_style chat, as the user turn of the chat template), chat conversations up to their last assistant
turn (that turn's text is kept as the column `answer`), and format prompt: a `prompt` column holding a string or chat
messages, every other column kept as it is. A prompt is cut to its budget (rl.max_prompt_length, else
data.seq_length - rl.max_completion_length) as evaluation cuts one: the QA context from its end without looking at
the answer, else the left of the prompt; a chat prompt over budget is dropped and counted."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tuneforge.config.schema import DataConfig, DataSource, RLConfig
from tuneforge.config.sources import as_sources, source_name, validation_sets
from tuneforge.data.prepare import template_for
from tuneforge.data.records import Record, _get, _Reader, iter_rows, load_source_records
from tuneforge.data.tokenize import _chat_template, _template_of, chat_prompts_for, render_prompt
from tuneforge.data.truncate import fit_chat, fit_plain_prompt
from tuneforge.errors import UserError


@dataclass
class Prompt:
    ids: list[int]              # the prompt's tokens, special tokens and chat markers included
    shown: Any                  # the prompt as reward functions get it (TRL's `prompts`): a string or chat messages
    columns: dict               # the record's other fields (squad: context, question, answers, id)
    index: int = 0              # its position in its set: with the step, the key of its completions' sampling


@dataclass
class PreparedPrompts:
    examples: list[Prompt]
    names: list[str]                        # source names, in order
    bounds: list[int] = field(default_factory=lambda: [0])
    source_weights: list[float] = field(default_factory=list)
    notes: list[Counter] = field(default_factory=list)

    @property
    def bounds_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

    @property
    def weights(self) -> list[float]:
        return self.source_weights


def prompt_budget(data: DataConfig, rl: RLConfig) -> int:
    return rl.max_prompt_length or data.seq_length - rl.max_completion_length


def _columns(record: Record) -> dict:
    columns = dict(record.fields)
    if record.references:
        columns["answers"] = list(record.references)
    if record.id is not None:
        columns.setdefault("id", record.id)
    return columns


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _chat_prompt(messages: list[dict], template: str, tokenizer, budget: int, notes: Counter) -> list[int] | None:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
    ids = _encode(tokenizer, text, False)
    if len(ids) > budget:
        notes[f"chat prompts over {budget} tokens (dropped)"] += 1
        return None
    return ids


def read_prompts(source: DataSource, data: DataConfig, rl: RLConfig, tokenizer, notes: Counter) -> list[Prompt]:
    budget = prompt_budget(data, rl)
    chat = chat_prompts_for(data, tokenizer, source.path)
    prompts: list[Prompt] = []
    if source.format == "prompt":
        reader = _Reader("prompt", source.columns)
        column = reader.columns.get("prompt", "prompt")
        for where, row in iter_rows(source.path, source.split):
            if source.limit is not None and len(prompts) >= source.limit:
                break
            value = _get(row, "prompt", (str, list), where, column)
            columns = {k: v for k, v in row.items() if k != column}
            if isinstance(value, list):
                messages = _messages(value, where, column)
                template = chat.template if chat else _chat_template(tokenizer, data.chat_template, where,
                                                                     "a prompt given as chat messages")
                ids = _chat_prompt(messages, template, tokenizer, budget, notes)
            elif chat is not None:
                ids = _chat_prompt(chat.messages(value), chat.template, tokenizer, budget, notes)
            else:
                ids = _encode(tokenizer, value, True)
                if len(ids) > budget:
                    ids = ids[len(ids) - budget:]
                    notes[f"prompts cut to their last {budget} tokens"] += 1
            if ids is not None:
                prompts.append(Prompt(ids, value, columns))
        if not prompts:
            raise UserError(f"{source.path}: no usable prompts")
        return prompts
    records = load_source_records(source, notes)
    if source.format == "chat":
        template = chat.template if chat else _chat_template(tokenizer, data.chat_template, source.path)
        for r in records:
            last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
            messages = r.messages[:last]
            if not any(m["role"] == "user" for m in messages):
                notes["conversations without a user turn before the last assistant turn (dropped)"] += 1
                continue
            ids = _chat_prompt(messages, template, tokenizer, budget, notes)
            if ids is not None:
                prompts.append(Prompt(ids, messages, {"answer": r.messages[last]["content"], "id": r.id}))
        return prompts
    template = template_for(data, source)
    for r in records:
        def render(rec: Record, t=_template_of(template, r)) -> str:
            return render_prompt(t, rec, source.path)
        shown = render(r)
        if chat is not None:
            text = fit_chat(r, render, chat, tokenizer, budget, use_answer=False)[1]
            ids = _encode(tokenizer, text, False)
            if len(ids) > budget:
                notes[f"chat prompts over {budget} tokens (dropped)"] += 1
                continue
        else:
            ids = _encode(tokenizer, fit_plain_prompt(r, render, tokenizer, budget), True)[-budget:]
        prompts.append(Prompt(ids, shown, _columns(r)))
    return prompts


def _messages(value: list, where: str, column: str) -> list[dict]:
    for i, m in enumerate(value):
        _get(m, "role", str, f"{where}: {column}[{i}]")
        _get(m, "content", str, f"{where}: {column}[{i}]")
    if not value:
        raise UserError(f"{where}: field '{column}' is an empty list of messages")
    return value


def prepare_prompt_set(data: DataConfig, rl: RLConfig, sources: list[DataSource], tokenizer) -> PreparedPrompts:
    out = PreparedPrompts([], [])
    for source in sources:
        notes = Counter()
        got = read_prompts(source, data, rl, tokenizer, notes)
        if not got:
            raise UserError(f"{source.path}: no prompt fits within {prompt_budget(data, rl)} tokens")
        for p in got:
            p.index = len(out.examples)
            out.examples.append(p)
        out.names.append(source_name(source))
        out.bounds.append(len(out.examples))
        out.source_weights.append(source.weight)
        out.notes.append(notes)
    return out


def prepare_prompts(data: DataConfig, rl: RLConfig, tokenizer) -> tuple[PreparedPrompts, dict]:
    """The training prompts (a mixture of sources) and the named held-out prompt sets."""
    train = prepare_prompt_set(data, rl, as_sources(data.train), tokenizer)
    vals = {name: prepare_prompt_set(data, rl, [source], tokenizer) for name, source in validation_sets(data)}
    return train, vals


def prompt_summary_lines(train: PreparedPrompts, vals: dict, rl: RLConfig) -> list[str]:
    lines = []
    for name, lo, hi, notes in zip(train.names, train.bounds, train.bounds[1:], train.notes):
        lengths = [len(p.ids) for p in train.examples[lo:hi]]
        noted = "; ".join(f"{n} {why}" for why, n in notes.items()) or "nothing cut"
        lines.append(f"data: train {name}: {hi - lo} prompts, {min(lengths)}-{max(lengths)} tokens (mean "
                     f"{sum(lengths) / len(lengths):.1f}); {noted}")
    for name, val in vals.items():
        lines.append(f"data: validation '{name}': {len(val.examples)} prompts (greedy reward)")
    return lines
