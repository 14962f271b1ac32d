"""Fitting an over-long example or prompt into its token budget: the truncatable field (the QA context) is cut,
keeping a window around the answer, and the text re-rendered; without such a field, tokens go from the left of
the prompt, keeping a leading bos. The completion is never cut.

A cut is sized in tokens of the field alone, which is about what it saves in the whole text, so fitting takes a few
rounds of cut, re-render and re-tokenize: `shorten_contexts` for plain prompts (many records per round, one batched
tokenizer call each), `fit_chat` for chat turns (one record at a time: the chat template is the cost there). The
callers say how to render and tokenize (`tokenize.py`, which imports this module, and `eval/evaluate.py`)."""
from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

from tuneforge.data.records import Record

ROUNDS = 6  # cut-and-measure rounds at most: each cut removes about what is still over, so a few converge

E = TypeVar("E")  # an Example (tokenize.py), whose input_ids and labels are cut alike
T = TypeVar("T")


def cut_around(text: str, answer: str | None, n_tokens: int, offsets) -> str:
    """`text` less about n_tokens tokens (`offsets`: its tokens' character spans): from its end if the answer stays
    inside, else a window that ends a little after the answer; "" when nothing would be left."""
    keep = len(offsets) - n_tokens
    if keep <= 0:
        return ""
    pos = text.find(answer) if answer else -1
    if pos < 0 or offsets[keep - 1][1] >= pos + len(answer):
        return text[: offsets[keep - 1][1]]
    end_tok = next((k for k, (s, e) in enumerate(offsets) if e >= pos + len(answer)), len(offsets) - 1)
    last = min(len(offsets) - 1, end_tok + 16)
    first = max(0, last - keep + 1)
    return text[offsets[first][0]: offsets[last][1]]


def cut_left(ex: E, tokenizer, seq_length: int) -> E:
    """The example's last seq_length tokens (and labels), with its leading bos kept where it has one."""
    keep_bos = 1 if tokenizer.bos_token_id is not None and ex.input_ids[:1] == [tokenizer.bos_token_id] else 0
    cut = len(ex.input_ids) - seq_length
    return dataclasses.replace(ex, input_ids=ex.input_ids[:keep_bos] + ex.input_ids[keep_bos + cut:],
                               labels=ex.labels[:keep_bos] + ex.labels[keep_bos + cut:])


def shorten_contexts(records: list[Record], measured: list[tuple[int, T]],
                     measure: Callable[[list[Record]], list[tuple[int, T]]], limit: int, tokenizer, *,
                     use_answer: bool) -> list[tuple[Record, T | None]]:
    """Plain prompts: each record with its truncatable field cut until it measures at most `limit` tokens, for many
    records at once (SQuAD at seq_length 512 with a 512-token vocabulary cuts half of its 87k examples). measured[k]
    is record k's (tokens, what the caller keeps: its example or prompt) as it stands; `measure` re-renders and
    tokenizes the records a round has cut, in one batched call. Each record comes back with what its last
    measurement kept (still over `limit` where ROUNDS cuts were not enough), or None where its field was cut to
    nothing (left unmeasured). use_answer=False cuts from the end of the field without looking at the answer (an
    honest evaluation may not)."""
    records, measured = list(records), list(measured)
    kept: list[T | None] = [keep for _, keep in measured]
    active = list(range(len(records)))
    for _ in range(ROUNDS):
        over = [k for k in active if measured[k][0] > limit]
        if not over:
            break
        texts = list(dict.fromkeys(records[k].fields[records[k].truncatable] for k in over))
        offsets = dict(zip(texts, tokenizer(texts, return_offsets_mapping=True,
                                            add_special_tokens=False)["offset_mapping"]))
        active = []
        for k in over:
            record = records[k]
            text = record.fields[record.truncatable]
            text = cut_around(text, record.fields.get("answer") if use_answer else None,
                              measured[k][0] - limit + 2, offsets[text])
            records[k] = dataclasses.replace(record, fields=dict(record.fields, **{record.truncatable: text}))
            if text:
                active.append(k)
            else:
                kept[k] = None
        for k, m in zip(active, measure([records[k] for k in active]) if active else []):
            measured[k], kept[k] = m, m[1]
    return list(zip(records, kept))


def fit_plain_prompt(record: Record, render: Callable[[Record], str], tokenizer, budget: int) -> str:
    """Evaluation: `render(record)` in at most `budget` tokens (special tokens included): its truncatable field cut
    from the end without looking at the answer, then, if still over, text dropped from the left of the prompt."""
    def measure(cut: list[Record]) -> list[tuple[int, str]]:
        prompts = [render(r) for r in cut]
        return [(len(ids), p) for p, ids in zip(prompts, tokenizer(prompts)["input_ids"])]

    prompt = render(record)
    if record.truncatable in record.fields:
        [(record, shortened)] = shorten_contexts([record], measure([record]), measure, budget, tokenizer,
                                                 use_answer=False)
        prompt = shortened if shortened is not None else render(record)  # the field cut to nothing
    excess = len(tokenizer(prompt)["input_ids"]) - budget
    if excess > 0:  # nothing left to cut inside: drop text from the left of the prompt
        offsets = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        prompt = prompt[offsets[min(excess + 1, len(offsets) - 1)][0]:]
    return prompt


def fit_chat(record: Record, render: Callable[[Record], str], chat, tokenizer, limit: int,
             completion: str | None = None, *, use_answer: bool) -> tuple[Record, str]:
    """Chat turns: `render(record)` as the user turn of `chat` (a ChatPrompts), `completion` as the assistant's
    (None: the generation prompt that opens it), the truncatable field cut until the conversation is at most
    `limit` tokens. Returns the record as rendered, its `messages` the turns, and their text. The last rendering
    stays, over or not: the caller cuts tokens or keeps it whole. use_answer as in `shorten_contexts`."""
    field = record.truncatable
    for n in range(1, ROUNDS + 1):  # ROUNDS renderings, a cut between two
        messages = chat.messages(render(record), completion)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None,
                                             chat_template=chat.template)
        fitted = dataclasses.replace(record, messages=messages)
        excess = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - limit
        if excess <= 0 or n == ROUNDS or not field or field not in record.fields or not record.fields[field]:
            break
        context = record.fields[field]
        offsets = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        context = cut_around(context, record.fields.get("answer") if use_answer else None, excess + 2, offsets)
        record = dataclasses.replace(record, fields=dict(record.fields, **{field: context}))
    return fitted, text
