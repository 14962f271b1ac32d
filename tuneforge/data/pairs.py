"""Preference pairs (data format `preference`): read, render, tokenize, truncate, and batch them.

A row is one of three shapes (any file kind the SFT data takes):
  strings         {"prompt": str, "chosen": str, "rejected": str}; with data.prompt_style chat the prompt is the user
                  turn (after data.system_prompt) and each completion the assistant turn of the chat template
  conversational  {"prompt": [messages], "chosen": [assistant messages] or str, "rejected": ...}
  implicit prompt {"chosen": [whole conversation], "rejected": [whole conversation]}: the messages both share from
                  the start are the prompt, the rest are the completions

The prompt is tokenized once and each side as prompt + completion; a completion is the joint text's tokens after the
prompt's, so both sides share the prompt token for token. Where the joint text tokenizes the prompt's end
differently (a BPE merge across the boundary), the prompt keeps the tokens both joint texts agree on and the merged
token goes to the completions (as TRL does), and the log counts it. A doubled bos (a template that writes one, a
tokenizer that adds another) loses one. Plain-text completions end with eos; chat completions end with the
template's end-of-turn marker.

Batches hold both sides of every pair in one forward: unpacked, rows 0..n-1 are the chosen sequences of the n pairs
and rows n..2n-1 the rejected ones; packed, several pairs share a row (each sequence its own block of restarted
position_ids). `segments` gives every labelled position the sequence it belongs to (pair j: chosen j, rejected
n + j), so the loss sums log-probabilities per sequence the same way in both layouts."""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tuneforge.config.schema import DataConfig, DataSource, PreferenceConfig
from tuneforge.config.sources import as_sources, source_name, validation_sets
from tuneforge.data.loader import build_eval_batches
from tuneforge.data.records import _get, _Reader, iter_rows
from tuneforge.data.tables import PreparedData, SourceReport
from tuneforge.data.tokenize import IGNORE, TokenizeStats, _chat_template, chat_prompts_for
from tuneforge.errors import UserError


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    index: int = 0  # position in its set: where its precomputed reference log-probs are

    @property
    def length(self) -> int:
        """Tokens of both sequences (what a packed row holds of it)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


class PairSet:
    """The pairs of one training mixture or validation set, indexable like a token table."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs
        for i, pair in enumerate(pairs):
            pair.index = i
        self.lengths = np.array([p.length for p in pairs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_label_tokens(self) -> int:
        return sum(len(p.chosen) + len(p.rejected) for p in self.pairs)


@dataclass
class PreparedPairs(PreparedData):
    """A training mixture or validation set of pairs (examples is a PairSet)."""
    notes: list[Counter] = field(default_factory=list)  # per source: what tokenizing and truncating did, counted


# ---- rows -> (prompt, chosen, rejected) texts -------------------------------------------------------------------

@dataclass
class _Texts:
    where: str
    prompt: str
    chosen: str
    rejected: str
    chat: bool  # rendered by a chat template (which writes bos and the turn markers itself)


def _messages(value, where: str, column: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    for i, m in enumerate(value):
        _get(m, "role", str, f"{where}: {column}[{i}]")
        _get(m, "content", str, f"{where}: {column}[{i}]")
    return value


def _empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not m["content"].strip() for m in value)


def _render_row(reader: _Reader, row, where: str, chat_template, chat_prompts, tokenizer) -> _Texts:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt_column = reader.columns.get("prompt", "prompt")
    has_prompt = row.get(prompt_column) is not None
    prompt = reader.get(row, "prompt", (str, list), where) if has_prompt else None
    chosen = reader.get(row, "chosen", (str, list), where)
    rejected = reader.get(row, "rejected", (str, list), where)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if _empty(value):
            raise UserError(f"{where}: field '{reader.columns.get(name, name)}' is empty")
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are the same; a pair needs two different completions")
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str) and chat_prompts is None:
        return _Texts(where, prompt, chosen, rejected, chat=False)
    template = chat_prompts.template if chat_prompts is not None else _chat_template(
        tokenizer, chat_template, where, "a conversational preference row")
    if prompt is None:  # implicit prompt: the messages both conversations share from the start
        chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise UserError(f"{where}: missing field 'prompt' (and chosen and rejected share no first message to "
                            "take it from)")
        prompt_messages, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not chosen or not rejected:
            raise UserError(f"{where}: chosen and rejected differ in no message after their shared prompt")
    elif isinstance(prompt, str):
        prompt_messages = (chat_prompts.messages(prompt) if chat_prompts is not None
                           else [{"role": "user", "content": prompt}])
    else:
        prompt_messages = _messages(prompt, where, "prompt")
    chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template)
    head = render(prompt_messages, True)
    texts = []
    for side in (chosen, rejected):
        whole = render(prompt_messages + side, False)
        if not whole.startswith(head):
            raise UserError(f"{where}: the chat template does not render the prompt as the start of the whole "
                            "conversation; cannot tell the completion from the prompt")
        texts.append(whole[len(head):])
    return _Texts(where, head, texts[0], texts[1], chat=True)


def read_pair_texts(source: DataSource, data: DataConfig, tokenizer) -> list[_Texts]:
    reader = _Reader("preference", source.columns)
    chat_prompts = chat_prompts_for(data, tokenizer, source.path)
    out = []
    for where, row in iter_rows(source.path, source.split):
        if source.limit is not None and len(out) >= source.limit:
            break
        out.append(_render_row(reader, row, where, data.chat_template, chat_prompts, tokenizer))
    if not out:
        raise UserError(f"{source.path}: no usable examples")
    return out


# ---- texts -> token ids -------------------------------------------------------------------------------------------

def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _cut_prompt(ids: list[int], keep: int, mode: str, bos: int | None) -> list[int]:
    if len(ids) <= keep:
        return ids
    if mode == "keep_start":
        return ids[:keep]
    lead = 1 if bos is not None and ids[:1] == [bos] and keep >= 2 else 0
    return ids[:lead] + ids[len(ids) - (keep - lead):]


def tokenize_pairs(texts: list[_Texts], tokenizer, seq_length: int, pref: PreferenceConfig,
                   notes: Counter) -> list[Pair]:
    """Token ids of each pair, truncated to seq_length tokens per sequence: the prompt first (to
    max_prompt_length, then to what the longer completion leaves), the completions only when they alone do not
    fit. A prompt that alone fills seq_length is the data's error."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pairs = []
    for chat in (False, True):
        group = [t for t in texts if t.chat == chat]
        if not group:
            continue
        prompts = _encode(tokenizer, [t.prompt for t in group], special=not chat)
        joint = {side: _encode(tokenizer, [t.prompt + getattr(t, side) for t in group], special=not chat)
                 for side in ("chosen", "rejected")}
        for k, t in enumerate(group):
            prompt, chosen, rejected = prompts[k], joint["chosen"][k], joint["rejected"][k]
            # the prompt's tokens as the whole texts have them: a BPE merge across the boundary moves the merged
            # token into both completions, so they still share one prompt
            shared = len(os.path.commonprefix([prompt, chosen, rejected]))
            if shared < len(prompt):
                notes["prompts whose last tokens merge into the completion (moved to the completion)"] += 1
                prompt = prompt[:shared]
            chosen, rejected = chosen[shared:], rejected[shared:]
            if not chat and eos is not None:
                chosen, rejected = (ids if ids[-1:] == [eos] else ids + [eos] for ids in (chosen, rejected))
            if bos is not None and len(prompt) >= 2 and prompt[0] == prompt[1] == bos:
                prompt = prompt[1:]
                notes["doubled bos removed"] += 1
            pairs.append((t.where, prompt, chosen, rejected))
    order = {t.where: i for i, t in enumerate(texts)}
    pairs.sort(key=lambda p: order[p[0]])
    return [_fit(where, prompt, chosen, rejected, seq_length, pref, bos, notes)
            for where, prompt, chosen, rejected in pairs]


def _fit(where: str, prompt: list[int], chosen: list[int], rejected: list[int], seq_length: int,
         pref: PreferenceConfig, bos: int | None, notes: Counter) -> Pair:
    if not prompt:
        raise UserError(f"{where}: the prompt has no tokens (the first completion token needs one before it)")
    if pref.max_prompt_length and len(prompt) > pref.max_prompt_length:
        prompt = _cut_prompt(prompt, pref.max_prompt_length, pref.truncation_mode, bos)
        notes["prompt cut to preference.max_prompt_length"] += 1
    if len(prompt) >= seq_length:
        raise UserError(f"{where}: the prompt alone is {len(prompt)} tokens, data.seq_length is {seq_length}: no "
                        "room for a completion; raise data.seq_length or set preference.max_prompt_length")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > seq_length:
        room = seq_length - longest
        if room >= 1:
            prompt = _cut_prompt(prompt, room, pref.truncation_mode, bos)
            notes["prompt truncated to fit seq_length"] += 1
        else:  # the completions alone overflow: keep up to half the row for the prompt, cut their ends
            prompt = _cut_prompt(prompt, max(1, min(len(prompt), seq_length // 2)), pref.truncation_mode, bos)
            chosen, rejected = chosen[:seq_length - len(prompt)], rejected[:seq_length - len(prompt)]
            notes["completion truncated to fit seq_length"] += 1
    return Pair(prompt, chosen, rejected)


# ---- sets -----------------------------------------------------------------------------------------------------

def prepare_pair_set(data: DataConfig, pref: PreferenceConfig, sources: list[DataSource], tokenizer) -> PreparedPairs:
    pairs, reports, bounds, all_notes = [], [], [0], []
    for source in sources:
        started, notes = time.perf_counter(), Counter()
        texts = read_pair_texts(source, data, tokenizer)
        got = tokenize_pairs(texts, tokenizer, data.seq_length, pref, notes)
        truncated = sum(n for why, n in notes.items() if "truncated" in why or "cut" in why)
        reports.append(SourceReport(source_name(source), source.path, "preference", len(texts),
                                    TokenizeStats(len(got), truncated), sum(p.length for p in got),
                                    sum(len(p.chosen) + len(p.rejected) for p in got), False,
                                    time.perf_counter() - started, source.weight))
        all_notes.append(notes)
        pairs.extend(got)
        bounds.append(len(pairs))
    return PreparedPairs(PairSet(pairs), reports, bounds, notes=all_notes)


def prepare_pairs(data: DataConfig, pref: PreferenceConfig, tokenizer) -> tuple[PreparedPairs, dict]:
    """The training mixture of pairs and the named held-out pair sets."""
    train = prepare_pair_set(data, pref, as_sources(data.train), tokenizer)
    vals = {name: prepare_pair_set(data, pref, [source], tokenizer) for name, source in validation_sets(data)}
    return train, vals


def pack_capacity(pairs: PairSet, seq_length: int) -> int:
    """Tokens of a packed row of pairs: seq_length, or the longest pair where a pair (both sequences, which share
    a row) is longer. Measured before packed rows attended per example, when sdpa attended over the whole row under
    a block mask: rows of 2 x seq_length made packing 0.7x the speed of padding on SQuAD pairs (benchmarks/RESULTS.md).
    Per-example attention no longer pays for the row's length, but the rows' size also bounds a micro-batch's
    activations, so it stays."""
    return max(seq_length, int(pairs.lengths.max()) if len(pairs) else 0)


def pair_summary_lines(train: PreparedPairs, vals: dict, seq_length: int, batching: str) -> list[str]:
    lines = []
    for s, counted in zip(train.sources, train.notes):
        notes = "; ".join(f"{n} {why}" for why, n in counted.items()) or "nothing truncated"
        lines.append(f"data: train {s.name} (preference, {s.path}): {s.records} pairs, {s.tokens:,} tokens "
                     f"({s.label_tokens:,} in completions); {notes}")
    for name, val in vals.items():
        lines.append(f"data: validation '{name}': {len(val.examples)} pairs, {val.examples.num_tokens:,} tokens")
    lengths = train.examples.lengths
    how = (f"packing (both sequences of a pair in one row; rows of {pack_capacity(train.examples, seq_length)} "
           "tokens)" if batching == "packing" else batching)
    lines.append(f"data: pair lengths (prompt twice + chosen + rejected) min {lengths.min()}, mean "
                 f"{lengths.mean():.1f}, max {lengths.max()}; batching {how}")
    return lines


# ---- batches --------------------------------------------------------------------------------------------------

def is_pair_batch(batch: dict) -> bool:
    return "segments" in batch


def count_pairs(batch: dict) -> int:
    """The pairs a batch holds (a rank's filler pairs, index -1, count for nothing)."""
    return int((batch["pair_index"] >= 0).sum())


class PairCollator:
    """Pairs -> 2n right-padded rows: chosen sequences first, then the rejected ones in the same pair order."""

    def __init__(self, pad_id: int, width: int | None = None):
        self.pad_id, self.width = pad_id, width

    def __call__(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        n = len(pairs)
        seqs = [(p.prompt, p.chosen, j) for j, p in enumerate(pairs)] + \
            [(p.prompt, p.rejected, n + j) for j, p in enumerate(pairs)]
        width = self.width or max(len(a) + len(b) for a, b, _ in seqs)
        ids = torch.full((2 * n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((2 * n, width), IGNORE, dtype=torch.long)
        segments = torch.full((2 * n, width), -1, dtype=torch.long)
        mask = torch.zeros((2 * n, width), dtype=torch.long)
        for r, (prompt, completion, seq) in enumerate(seqs):
            a, b = len(prompt), len(prompt) + len(completion)
            ids[r, :b] = torch.tensor(prompt + completion)
            labels[r, a:b] = torch.tensor(completion)
            segments[r, a:b] = seq
            mask[r, :b] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "segments": segments,
                "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long)}


class PackedPairCollator:
    """Rows of pairs -> rows holding both sequences of each of their pairs, each sequence a block of restarted
    position_ids (no attention mask: transformers reads the blocks from the positions, as for packed SFT)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[list[Pair]]) -> dict[str, torch.Tensor]:
        pairs = [p for row in rows for p in row]
        n, width = len(pairs), max(sum(p.length for p in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        j = 0
        for r, row in enumerate(rows):
            at = 0
            for p in row:
                for completion, seq in ((p.chosen, j), (p.rejected, n + j)):
                    a, b = at + len(p.prompt), at + len(p.prompt) + len(completion)
                    ids[r, at:b] = torch.tensor(p.prompt + completion)
                    labels[r, a:b] = torch.tensor(completion)
                    segments[r, a:b] = seq
                    positions[r, at:b] = torch.arange(b - at)
                    at = b
                j += 1
            positions[r, at:] = torch.arange(width - at)  # the padding: a block of its own
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "segments": segments,
                "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
                "num_tokens": torch.tensor(sum(p.length for p in pairs))}


def build_pair_collator(batching: str, pad_id: int, seq_length: int):
    if batching == "packing":
        return PackedPairCollator(pad_id)
    return PairCollator(pad_id, seq_length if batching == "pad_to_max_length" else None)


def pair_eval_batches(pairs: PairSet, batch_size: int, pad_id: int, rank: int, world_size: int, batching: str,
                      seq_length: int) -> list[dict]:
    """Held-out (or reference-pass) batches of this rank's share, in file order, as many on every rank (a rank with
    fewer adds a filler pair, index -1, that counts for nothing): loader.build_eval_batches with the pair layout."""
    return build_eval_batches(pairs, batch_size, pad_id, rank, world_size, batching, seq_length,
                              collate_fn=build_pair_collator(batching, pad_id, seq_length),
                              row_tokens=pack_capacity(pairs, seq_length))
