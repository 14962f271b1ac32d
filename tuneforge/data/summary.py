"""What training will see: per-source counts, drops and truncations, lengths, padding waste or packing efficiency,
and one rendered example with its labelled span marked. Used by the training log and `tuneforge prepare-data`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tuneforge.config.schema import Config, DataConfig
from tuneforge.config.sources import as_sources
from tuneforge.data.loader import MicroBatchSampler, batching_report
from tuneforge.data.pairs import pair_summary_lines, prepare_pairs
from tuneforge.data.prepare import prepare_data, template_for
from tuneforge.data.tables import PreparedData
from tuneforge.data.tokenize import IGNORE, _template_of, render_prompt
from tuneforge.errors import UserError


def efficiency_line(data: DataConfig, lengths: np.ndarray, sampler: MicroBatchSampler) -> str:
    """Padding waste or packing efficiency of the first epoch's plan (the rank-0 view of all ranks' batches)."""
    r = batching_report(lengths, sampler._plan(0), data.batching, data.seq_length)
    if data.batching == "packing":
        return (f"batching packing: {r['rows']:,} rows of {data.seq_length} tokens per epoch, "
                f"{r['examples_per_row']:.2f} examples per row, packing efficiency {100 * r['packing_efficiency']:.1f}%"
                f" (padding waste {100 * r['padding_waste']:.1f}% of the tokens computed)")
    return (f"batching {data.batching}: {r['micro_batches']:,} micro-batches per epoch, padding waste "
            f"{100 * r['padding_waste']:.1f}% ({r['computed_tokens'] - r['real_tokens']:,} pad of "
            f"{r['computed_tokens']:,} tokens computed)")


def data_summary_lines(train: PreparedData, vals: dict[str, PreparedData], sampler: MicroBatchSampler,
                       data: DataConfig) -> list[str]:
    lines = [f"data: train {s.line()}" + (f"; weight {s.weight:g}" if len(train.sources) > 1 else "")
             for s in train.sources]
    for name, val in vals.items():
        lines.append(f"data: validation '{name}': {len(val.examples)} examples, {val.examples.num_tokens:,} tokens"
                     + ("" if name == "val_split" else f" ({val.sources[0].stats.summary()})"))
    lines.append("data: " + efficiency_line(data, train.examples.lengths, sampler))
    return lines


def length_histogram(lengths: np.ndarray, seq_length: int, bins: int = 8, width: int = 40) -> list[str]:
    edges = np.linspace(0, seq_length, bins + 1).astype(int)
    counts, _ = np.histogram(np.minimum(lengths, seq_length), bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  {lo:>6}-{hi:<6} {'#' * int(round(width * c / top)):<{width}} {c:,}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def render_example(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The example's text with the labelled (trained-on) tokens between >>> and <<< (each run decoded whole, so
    sentencepiece spacing survives)."""
    on = [label != IGNORE and k > 0 for k, label in enumerate(labels)]
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or on[k] != on[start]:
            text = tokenizer.decode(ids[start:k])
            out.append(f" >>>{text}<<< " if on[start] else text)
            start = k
    return "".join(out)


def print_pair_report(cfg: Config, tokenizer, out: str | None = None) -> None:
    """prepare-data for preference pairs: counts, what truncation did, lengths, and the first pair's tokens."""
    if out is not None:
        raise UserError("prepare-data --out: writes prompt/completion records; preference pairs are already "
                        "prompt, chosen and rejected (run without --out)")
    train, vals = prepare_pairs(cfg.data, cfg.preference, tokenizer)
    print("\n".join(pair_summary_lines(train, vals, cfg.data.seq_length, cfg.data.batching)))
    p = train.examples[0]
    print("pair 0, prompt then >>>chosen<<< and >>>rejected<<<:")
    print(tokenizer.decode(p.prompt) + " >>>" + tokenizer.decode(p.chosen) + "<<<")
    print(tokenizer.decode(p.prompt) + " >>>" + tokenizer.decode(p.rejected) + "<<<")


def print_data_report(cfg: Config, tokenizer, out: str | None = None) -> None:
    if cfg.preference is not None:
        print_pair_report(cfg, tokenizer, out)
        return
    data = cfg.data
    train, vals = prepare_data(data, tokenizer, cfg.run.seed, progress=True, keep_records=out is not None)
    print(f"train: {len(train.examples):,} examples, {train.examples.num_tokens:,} tokens "
          f"({train.examples.num_label_tokens:,} labelled) from {len(train.sources)} source(s)")
    for s in train.sources:
        dropped = ", ".join(f"{n} {why}" for why, n in s.stats.dropped.items()) or "none"
        print(f"  {s.name} [{s.format}] {s.path}" + (f" weight {s.weight:g}" if len(train.sources) > 1 else ""))
        print(f"    records {s.records:,} -> examples {s.stats.examples:,}; tokens {s.tokens:,} "
              f"({s.label_tokens:,} labelled); truncated {s.stats.truncated:,}; dropped: {dropped}"
              + ("; from cache" if s.cached else f"; tokenized in {s.seconds:.1f}s"))
    for name, val in vals.items():
        print(f"validation '{name}': {len(val.examples):,} examples, {val.examples.num_tokens:,} tokens")
        if name != "val_split":
            s = val.sources[0]
            print(f"    records {s.records:,}; truncated {s.stats.truncated:,}; dropped: "
                  + (", ".join(f"{n} {why}" for why, n in s.stats.dropped.items()) or "none"))
    lengths = train.examples.lengths
    print(f"lengths (tokens): min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()} "
          f"(seq_length {data.seq_length})")
    print("\n".join(length_histogram(lengths, data.seq_length)))
    t = cfg.train
    sampler = MicroBatchSampler(len(train.examples), t.micro_batch_size, cfg.run.seed, batching=data.batching,
                                lengths=lengths, seq_length=data.seq_length, sizes=train.bounds_sizes,
                                weights=train.weights)
    print(efficiency_line(data, lengths, sampler))
    ex = train.examples[0]
    print("example 0 (trained-on tokens between >>> and <<<):")
    print(render_example(tokenizer, ex.input_ids, ex.labels))
    if out is not None:
        write_formatted(cfg.data, train, Path(out))
        print(f"wrote {len(train.records):,} formatted records to {out}")


def write_formatted(data: DataConfig, train: PreparedData, path: Path) -> None:
    """The rendered prompt (input) and completion (output) of every training record, as jsonl."""
    sources = as_sources(data.train)
    with open(path, "w", encoding="utf-8") as f:
        k = 0
        for source, report in zip(sources, train.sources):
            template = template_for(data, source)
            n = report.records - sum(v for why, v in report.stats.dropped.items() if why.startswith("unanswerable"))
            for record in train.records[k:k + n]:
                if record.messages is not None:
                    row = {"messages": record.messages}
                else:
                    row = {"input": render_prompt(_template_of(template, record), record, source.path),
                           "output": record.completion}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            k += n
