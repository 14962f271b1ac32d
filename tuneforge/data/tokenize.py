"""Render records with the prompt template and tokenize them with a loss mask.

Labels are -100 on prompt tokens (unless train_on_inputs), so the loss sees only the completion and its eos.
Over-long examples shorten the truncatable field (the QA context, keeping a window around the answer) or the
left of the prompt (`truncate.py`); the completion is never cut, and examples that still do not fit are dropped and
counted."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tuneforge.data.records import DEFAULT_TEMPLATES, Record
from tuneforge.data.truncate import cut_left, fit_chat, shorten_contexts
from tuneforge.errors import UserError

IGNORE = -100
_ALPACA_DEFAULTS = (DEFAULT_TEMPLATES["alpaca"], DEFAULT_TEMPLATES["dolly"])


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return f"{self.examples} examples, {self.truncated} truncated, dropped: {drops}"


def render_prompt(template: str, record: Record, source: str) -> str:
    try:
        return template.format(**record.fields)
    except KeyError as e:
        raise UserError(f"{source}: prompt_template names field {{{e.args[0]}}}, which the records do not have "
                        f"(available: {', '.join(sorted(record.fields))})") from None
    except (IndexError, ValueError) as e:
        raise UserError(f"{source}: bad prompt_template ({e})") from None


@dataclass(frozen=True)
class ChatPrompts:
    """data.prompt_style chat: a rendered prompt becomes the user turn (after an optional system turn) of the chat
    template, and its completion the assistant turn. The template writes bos and the turn markers itself."""
    template: str
    system: str | None = None

    def messages(self, prompt: str, completion: str | None = None) -> list[dict]:
        turns = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": prompt}]
        return turns + ([{"role": "assistant", "content": completion}] if completion is not None else [])

    def render(self, tokenizer, prompt: str) -> str:
        """The text a model continues with its answer (the generation prompt opens the assistant turn)."""
        return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True,
                                             chat_template=self.template)


def chat_prompts_for(data, tokenizer, source: str = "data") -> ChatPrompts | None:
    """The recipe's chat prompting (data.prompt_style chat), or None for plain prompts."""
    if data.prompt_style != "chat":
        return None
    return ChatPrompts(_chat_template(tokenizer, data.chat_template, source, "data.prompt_style chat"),
                       data.system_prompt)


def fit_chat_records(records: list[Record], template: str, chat: ChatPrompts, tokenizer, seq_length: int,
                     source: str) -> list[Record]:
    """Records as conversations (prompt as the user turn, completion as the assistant's). A conversation longer
    than seq_length loses text from its truncatable field (the QA context) around the answer, never the answer
    (`fit_chat`); `tokenize_chat` cuts what is still over from the left."""
    def render(record: Record) -> str:
        return render_prompt(_template_of(template, record), record, source)

    # a chat answer opens its own turn: no leading space
    return [fit_chat(r, render, chat, tokenizer, seq_length, r.completion.strip(), use_answer=True)[0]
            for r in records]


def _template_of(template: str, record: Record) -> str:
    """Alpaca/dolly records without an input use the no-input variant of the default prompt."""
    return record.template if record.template is not None and template in _ALPACA_DEFAULTS else template


def tokenize_records(records: list[Record], tokenizer, template: str, seq_length: int,
                     train_on_inputs: bool = False, source: str = "data", truncation: str = "auto",
                     progress=None) -> tuple[list[Example], TokenizeStats]:
    """Batched fast tokenization of prompt+completion with character offsets; the prompt/completion boundary is
    the first token that ends past the prompt's last character (one pass, no re-tokenization of the prompt)."""
    stats = TokenizeStats()
    prompts = [render_prompt(_template_of(template, r), r, source) for r in records]
    encoded = _encode_shared(records, prompts, template, tokenizer, train_on_inputs)
    if progress is not None:
        progress(sum(ex is not None for ex in encoded))
    todo = [i for i, ex in enumerate(encoded) if ex is None]
    for start in range(0, len(todo), 1024):
        chunk = todo[start:start + 1024]
        if progress is not None:
            progress(len(chunk))
        enc = tokenizer([prompts[i] + records[i].completion for i in chunk], return_offsets_mapping=True,
                        add_special_tokens=True)
        for i, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            encoded[i] = _finish(ids, offsets, len(prompts[i]), tokenizer, train_on_inputs)
    contexts = []  # examples whose QA context is cut, all together
    for i, (record, prompt, ex) in enumerate(zip(records, prompts, encoded)):
        if len(ex.input_ids) <= seq_length:
            continue
        why = _why_drop(prompt, ex, seq_length, train_on_inputs, truncation)
        if why:
            stats.dropped[why] += 1
            encoded[i] = None
        elif truncation == "auto" and prompt and record.truncatable and record.truncatable in record.fields:
            contexts.append(i)
        else:  # plain text keeps its first seq_length tokens, a prompt loses tokens from its left
            encoded[i] = (cut_left(ex, tokenizer, seq_length) if prompt
                          else Example(ex.input_ids[:seq_length], ex.labels[:seq_length]))
            stats.truncated += 1
    shortened = _shorten_contexts([records[i] for i in contexts], [encoded[i] for i in contexts], template,
                                  tokenizer, seq_length, train_on_inputs, source)
    for i, ex in zip(contexts, shortened):
        encoded[i] = ex
        if ex is None:
            stats.dropped["too long after truncating the context"] += 1
        else:
            stats.truncated += 1
    return _keep_labelled([ex for ex in encoded if ex is not None], stats, source)


def _shared_split(template: str, record: Record) -> tuple[str, str, str] | None:
    """prompt+completion as (head, ' ' + shared field, tail), split just before a space on both sides, or None.

    SQuAD has ~4.6 questions per context: tokenizing each distinct context once instead of once per question cuts
    the tokenizer's work ~4x (the measured bottleneck). Pre-tokenizers of BPE/sentencepiece tokenizers (ByteLevel,
    Metaspace, the Llama-3 regex) start a new word at a space that follows a non-space, so the pieces tokenize
    exactly as the whole; `_encode_shared` also checks that on a sample and falls back if not."""
    name = record.truncatable
    if not name or template.count("{" + name + "}") != 1 or name not in record.fields:
        return None
    pre, post = template.split("{" + name + "}")
    try:
        head, tail = pre.format(**record.fields), post.format(**record.fields) + record.completion
    except (KeyError, IndexError, ValueError):
        return None
    shared = record.fields[name]
    if not (len(head) >= 2 and head[-1] == " " and not head[-2].isspace() and shared and not shared[0].isspace()
            and not shared[-1].isspace() and len(tail) >= 2 and tail[0] == " " and not tail[1].isspace()):
        return None
    return head[:-1], " " + shared, tail


def _encode_shared(records: list[Record], prompts: list[str], template: str, tokenizer,
                   train_on_inputs: bool) -> list[Example | None]:
    """Examples for records whose long field (the QA context) repeats, built from its tokens encoded once; None
    where the plain path must encode the whole text."""
    out: list[Example | None] = [None] * len(records)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [_shared_split(_template_of(template, r), r) for r in records]
    idx = [i for i, p in enumerate(parts) if p is not None]
    shared = list(dict.fromkeys(parts[i][1] for i in idx))
    if backend is None or len(idx) < 64 or len(shared) > 0.7 * len(idx):
        return out
    eos = tokenizer.eos_token_id  # a property lookup through transformers' __getattr__: once, not per example
    heads = list(dict.fromkeys(parts[i][0] for i in idx))
    enc_head = {h: e.ids for h, e in zip(heads, backend.encode_batch(heads, add_special_tokens=True))}
    enc_shared = {c: e.ids for c, e in zip(shared, backend.encode_batch(shared, add_special_tokens=False))}
    tails = backend.encode_batch([parts[i][2] for i in idx], add_special_tokens=False)
    for i, tail in zip(idx, tails):
        head, middle, _ = parts[i]
        before = len(head) + len(middle)
        prompt_chars = len(prompts[i]) - before  # the prompt ends inside the tail
        k = next((k for k, (s, e) in enumerate(tail.offsets) if e > prompt_chars and e > s), len(tail.ids))
        ids = enc_head[head] + enc_shared[middle] + tail.ids
        out[i] = _finish_at(ids, len(ids) - len(tail.ids) + k, eos, train_on_inputs)
    for i in idx[:32]:  # the pieces must tokenize exactly as the whole text does, or nothing is gained
        enc = tokenizer(prompts[i] + records[i].completion, return_offsets_mapping=True, add_special_tokens=True)
        if _finish(enc["input_ids"], enc["offset_mapping"], len(prompts[i]), tokenizer, train_on_inputs) != out[i]:
            return [None] * len(records)
    return out


def _keep_labelled(examples: list[Example], stats: TokenizeStats, source: str) -> tuple[list[Example], TokenizeStats]:
    """Drop (and count) examples with nothing to learn; none left at all is the user's error."""
    kept = [ex for ex in examples if not _no_labels(ex)]
    if len(kept) < len(examples):
        stats.dropped["with no label tokens"] += len(examples) - len(kept)
    stats.examples = len(kept)
    if not kept:
        raise UserError(f"{source}: no examples left after tokenization ({stats.summary()})")
    return kept, stats


def _no_labels(ex: Example) -> bool:
    return ex.labels[1:].count(IGNORE) == len(ex.labels) - 1  # labels[0] is never a target (labels shift by one)


def _finish_at(ids: list[int], boundary: int, eos: int | None, train_on_inputs: bool) -> Example:
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    boundary = min(boundary, len(ids))
    if eos is not None:
        ids.append(eos)
    labels = list(ids) if train_on_inputs else [IGNORE] * boundary + ids[boundary:]
    return Example(ids, labels)


def _finish(ids: list[int], offsets, prompt_chars: int, tokenizer, train_on_inputs: bool) -> Example:
    eos = tokenizer.eos_token_id
    ids = list(ids)
    if ids and eos is not None and ids[-1] == eos:
        ids, offsets = ids[:-1], offsets[:-1]  # tokenizers that append eos themselves: we add it once below
    boundary = next((k for k, (s, e) in enumerate(offsets) if e > prompt_chars and e > s), len(ids))
    if eos is not None:
        ids.append(eos)
    labels = list(ids) if train_on_inputs else [IGNORE] * boundary + ids[boundary:]
    return Example(ids, labels)


def _why_drop(prompt: str, ex: Example, seq_length: int, train_on_inputs: bool, truncation: str) -> str | None:
    """Why an example longer than seq_length is dropped rather than cut, or None."""
    if truncation == "drop":
        return "longer than seq_length (truncation: drop)"
    if prompt and not train_on_inputs and sum(1 for label in ex.labels if label != IGNORE) + 8 > seq_length:
        return "completion longer than seq_length"
    return None


def _shorten_contexts(records: list[Record], examples: list[Example], template: str, tokenizer, seq_length: int,
                      train_on_inputs: bool, source: str) -> list[Example | None]:
    """The examples re-tokenized with their QA context cut to fit seq_length (`shorten_contexts`: a few rounds,
    each one batched tokenizer call), None where the context cannot be cut enough."""
    def measure(cut: list[Record]) -> list[tuple[int, Example]]:
        prompts = [render_prompt(_template_of(template, r), r, source) for r in cut]
        enc = tokenizer([p + r.completion for p, r in zip(prompts, cut)], return_offsets_mapping=True,
                        add_special_tokens=True)
        out = [_finish(ids, offs, len(p), tokenizer, train_on_inputs)
               for p, ids, offs in zip(prompts, enc["input_ids"], enc["offset_mapping"])]
        return [(len(ex.input_ids), ex) for ex in out]

    shortened = shorten_contexts(records, [(len(ex.input_ids), ex) for ex in examples], measure, seq_length, tokenizer,
                                 use_answer=True)
    return [ex if ex is not None and len(ex.input_ids) <= seq_length else None for _, ex in shortened]


def _chat_template(tokenizer, chat_template: str | None, source: str, what: str = "format chat") -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError(f"{source}: {what} needs a chat template and the tokenizer has none; "
                        f"set data.chat_template")
    return template


def _assistant_spans(tokenizer, messages: list[dict], template: str, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each turn's text plus the
    template's end-of-turn marker): turn i spans render(messages[:i], generation prompt) .. render(messages[:i+1])."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template)
    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(head) and text.startswith(upto) and len(upto) > len(head)):
            raise UserError(f"{where}: the chat template does not render this conversation turn by turn "
                            f"(assistant turn {i} is not a prefix of the whole); cannot find the assistant spans")
        spans.append((len(head), len(upto)))
    return text, spans


def tokenize_chat(records: list[Record], tokenizer, seq_length: int, train_on_inputs: bool = False,
                  source: str = "data", truncation: str = "auto", chat_template: str | None = None,
                  progress=None) -> tuple[list[Example], TokenizeStats]:
    """OpenAI-style conversations rendered with the chat template; the loss sees the assistant turns only.
    Over-long conversations lose tokens from the left (keeping bos) or are dropped (truncation: drop)."""
    template = _chat_template(tokenizer, chat_template, source)
    stats = TokenizeStats()
    examples: list[Example] = []
    rendered = [_assistant_spans(tokenizer, r.messages, template, f"{source}: {r.id}") for r in records]
    for start in range(0, len(rendered), 1024):
        chunk = rendered[start:start + 1024]
        if progress is not None:
            progress(len(chunk))
        # The template writes bos and the turn markers itself.
        enc = tokenizer([text for text, _ in chunk], return_offsets_mapping=True, add_special_tokens=False)
        for (_text, spans), ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            ids = list(ids)
            labels = list(ids) if train_on_inputs else [
                t if any(e > a and s < b for a, b in spans) else IGNORE for t, (s, e) in zip(ids, offsets)]
            ex = Example(ids, labels)
            if len(ids) > seq_length:
                if truncation == "drop":
                    stats.dropped["longer than seq_length (truncation: drop)"] += 1
                    continue
                ex = cut_left(ex, tokenizer, seq_length)
                stats.truncated += 1
            examples.append(ex)
    return _keep_labelled(examples, stats, source)
