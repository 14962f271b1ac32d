"""The architecture sweep: every type in the installed transformers' causal-LM mapping, as a tiny random model
(tests/models/tiny.py), trained by tuneforge as a user would (a saved model directory, a recipe, `finetune`) and
checked against transformers' and peft's own numbers.

Per type:
  plain   one LoRA forward/backward with plain transformers + peft; a type that fails here is listed with
          transformers' (or peft's) own error and not tried further
  lora    2 LoRA steps (all-linear) with packing, or pad_longest where tuneforge refuses packing; the step-0
          validation loss (tuneforge's head path and batching) equals the next-token loss of the model's own full
          forward on the same examples padded; the final adapter loaded by plain peft on the saved base gives the
          run's final validation loss
  full    2 full fine-tuning steps the same way; the final weights loaded by transformers give the run's final
          validation loss
  packing exact (the packed step-0 loss is the padded one) and through which path: per-example attention, or
          transformers' packed-sequence mask, or the model's own attention under tuneforge's block mask; or
          refused with tuneforge's reason
  head    split (the LM head on labelled positions only) or the full forward, with the reason

`python -m tests.models.sweep [TYPE ...]` runs it and prints the table; `--write` also writes docs/models.md."""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests.conftest import REPO, STORIES
from tests.models.tiny import CAUSAL_LM_TYPES, build_tiny_model, plain_peft_step

RTOL = 1e-4  # fp32; tuneforge's sums against transformers' means differ by rounding only
WORDS = ("red blue green small large river stone cloud light dark north south early late bright quiet old new "
         "swift slow warm cold tall short round sharp").split()


@dataclass
class Row:
    model_type: str
    plain: str = ""              # "ok" or transformers' / peft's error
    lora: str = ""               # "ok" or what failed
    full: str = ""
    packing: str = ""            # "exact (per example | packed-sequence mask | block mask)", or "refused: why"
    head: str = ""               # "split" or "full forward: why"
    attention: str = ""
    rl: str = ""                 # online RL: "ok (shared prompt cache)" / "ok (whole rows: why)" or what failed
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def trains(self) -> bool:
        return self.plain == "ok" and self.lora == "ok" and self.full == "ok"


def write_data(folder: Path) -> tuple[Path, Path]:
    """16 training and 4 validation records of 8-20 tokens: several fit one packed row of 64."""
    g = torch.Generator().manual_seed(0)

    def records(n):
        for _ in range(n):
            words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)]
            yield {"input": f"Which word follows {' '.join(words[:4])}?", "output": " ".join(words[4:])}
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "validation.jsonl"
    for path, n in zip(paths, (16, 4)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records(n)))
    return paths


def save_model(model_type: str, folder: Path) -> Path:
    from transformers import AutoTokenizer

    # 520 rows: for some model types (qwen2, qwen3_5_moe) transformers loads the stories260K files as their own
    # tokenizer class, which adds a pad token (id 512) of its own
    model = build_tiny_model(model_type, vocab_size=520)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    return folder


def recipe(model_dir: Path, data: tuple[Path, Path], out: Path, name: str, lora: bool, batching: str) -> dict:
    return {"run": {"name": name, "output_dir": str(out), "seed": 0},
            "model": {"name_or_path": str(model_dir), "dtype": "float32"},
            "peft": {"method": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear"} if lora
            else None,
            "data": {"train": {"path": str(data[0]), "format": "input_output"},
                     "validation": {"path": str(data[1]), "format": "input_output"},
                     "seq_length": 64, "batching": batching},
            "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 2, "log_every_steps": 1,
                      "optimizer": {"name": "adamw", "lr": 1e-3}, "compile": False},
            "checkpoint": {"every_steps": None},
            "logging": {"tensorboard": False, "progress": False}}


def finetune(config: dict) -> tuple[Path, str]:
    """Train in this process (report.html skipped: the sweep reads metrics.jsonl); returns the run and its output."""
    from tuneforge.api import finetune as run
    from tuneforge.train import recipe as recipe_module

    printed = io.StringIO()
    write_report, recipe_module.write_report = recipe_module.write_report, lambda run_dir: run_dir / "report.html"
    try:
        with contextlib.redirect_stdout(printed):
            run_dir = run(config)
    finally:
        recipe_module.write_report = write_report
    return run_dir, printed.getvalue()


def val_losses(run_dir: Path) -> tuple[float, float]:
    """The validation loss at step 0 and at the last step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return losses[0], losses[-1]


def own_loss(model, examples) -> float:
    """The mean next-token loss of the model's own full forward over the examples, right-padded in one batch with an
    attention mask, whatever tuneforge does: cross-entropy of its logits at t against the label at t + 1. (Not
    `model(..., labels=...).loss`: BART's, TrOCR's, Whisper's, XLM's, XLNet's and CPM-Ant's causal-LM classes expect
    labels already shifted, ProphetNet's adds its n-gram streams.)"""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100))


def validation_examples(model_dir: Path, path: Path):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.data import DEFAULT_TEMPLATES, load_records, tokenize_records
    from tuneforge.models.load import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    return tokenize_records(load_records(str(path), "input_output"), tok, DEFAULT_TEMPLATES["input_output"], 64)[0]


def first_line_of(output: str, prefix: str) -> str | None:
    return next((line.strip()[len(prefix):] for line in output.splitlines() if line.strip().startswith(prefix)), None)


def check_close(what: str, ours: float, theirs: float) -> str | None:
    if abs(ours - theirs) <= RTOL * max(1.0, abs(theirs)):
        return None
    return f"{what}: tuneforge {ours:.6f}, transformers {theirs:.6f}"


def sweep_one(model_type: str, work: Path) -> Row:
    """Everything the sweep asks of one type; failures are recorded in the row, never raised."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.errors import UserError

    row, started = Row(model_type), time.perf_counter()
    try:
        plain_peft_step(model_type)
        row.plain = "ok"
    except Exception as e:  # noqa: BLE001 - transformers' own error is the finding
        row.plain = f"{type(e).__name__}: {_first(e)}"
        row.seconds = time.perf_counter() - started
        return row
    data = write_data(work / "data")
    try:  # a model transformers cannot save and load back is transformers' failure too
        model_dir = save_model(model_type, work / "model")
        base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        row.plain = f"save and reload: {type(e).__name__}: {_first(e)}"
        row.seconds = time.perf_counter() - started
        return row
    try:
        examples = validation_examples(model_dir, data[1])
        base = own_loss(base_model, examples)
    except Exception as e:  # noqa: BLE001
        row.lora = row.full = f"setup: {type(e).__name__}: {_first(e)}"
        row.seconds = time.perf_counter() - started
        return row
    batching = "packing"
    for kind in ("lora", "full"):
        try:
            try:
                run_dir, output = finetune(recipe(model_dir, data, work / "runs", kind, kind == "lora", batching))
            except UserError as e:
                refused = re.match(r"data\.batching: packing is not exact for \w+: (.*); use data\.batching", str(e))
                if batching != "packing" or not refused:
                    raise
                row.packing, batching = f"refused: {refused.group(1)}", "pad_longest"
                run_dir, output = finetune(recipe(model_dir, data, work / "runs", kind, kind == "lora", batching))
            start, end = val_losses(run_dir)
            if kind == "lora":
                row.attention = first_line_of(output, "attention: ") or ""
                why = first_line_of(output, "loss: the model's full forward, not the LM head on labelled positions "
                                            "only (")
                row.head = f"full forward: {why[:-1]}" if why else "split"
                path = first_line_of(output, "packed rows: ") or ""
                if batching == "packing":
                    row.packing = ("exact (per example)" if row.attention.endswith("; per example in packed rows")
                                   else "exact (block mask)" if path.startswith("the model's own attention")
                                   else "exact (packed-sequence mask)")
                reloaded = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), run_dir / "final")
            else:
                reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
            problems = [check_close(f"{kind} step-0 validation loss ({batching})", start, base),
                        check_close(f"{kind} final validation loss, final/ reloaded", end,
                                    own_loss(reloaded, examples))]
            problems = [p for p in problems if p]
            setattr(row, kind, "; ".join(problems) or "ok")
        except Exception as e:  # noqa: BLE001 - a failure of tuneforge's is the finding
            setattr(row, kind, f"{type(e).__name__}: {_first(e)}")
            row.notes.append(traceback.format_exc(limit=-3))
    try:
        row.rl = rl_check(base_model)
    except Exception as e:  # noqa: BLE001 - a failure of tuneforge's is the finding
        row.rl = f"{type(e).__name__}: {_first(e)}"
        row.notes.append(traceback.format_exc(limit=-3))
    row.seconds = time.perf_counter() - started
    return row


def rl_check(model) -> str:
    """Online RL on this type: tuneforge's sampler draws completions (KV cache, each group's prompt cache shared where
    the check allows it), and the training forward's log-probs of those completions equal the ones recorded while
    sampling (fp32, 1e-4)."""
    from tuneforge.eval.rollout import SamplingSettings, choose_sampling_mode, sample
    from tuneforge.models.load import resolve_precision
    from tuneforge.models.policy import _row_batch, check_shared_prefix, completion_logps
    from tuneforge.train.grpo import MAX_SAMPLER_GAP

    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    precision = resolve_precision("float32", "cpu")
    why = check_shared_prefix(lambda b: completion_logps(model, b), vocab, 0, "cpu")
    mode, why_mode, best = choose_sampling_mode(model, vocab, 0, "cpu", precision)
    if best > MAX_SAMPLER_GAP:
        return f"refused: {why_mode}"
    prompts = [[(i * 41) % (vocab - 3) + 3 for i in range(6)], [(i * 59) % (vocab - 3) + 3 for i in range(4)]]
    groups = [0, 0, 1, 1]
    got = sample(model.forward, prompts if why is None else [prompts[g] for g in groups], [21, 22, 23, 24],
                 SamplingSettings(6), 0, set(), "cpu", precision, groups=groups if why is None else None,
                 mode=mode)
    rows = [prompts[g] + c for g, c in zip(groups, got.completions)]
    with torch.no_grad():
        logps, _ = completion_logps(model, _row_batch(rows, [len(prompts[g]) for g in groups], 0, "cpu"))
    sampled = torch.tensor([lp for row in got.logps for lp in row])
    gap = float((logps - sampled).abs().max())
    if gap > 1e-4:
        alone = max(float((completion_logps(model, _row_batch([row], [len(prompts[g])], 0, "cpu"))[0]
                           - logps[sum(len(c) for c in got.completions[:k]):][:len(got.completions[k])]).abs().max())
                    for k, (row, g) in enumerate(zip(rows, groups)))
        if alone > 1e-4:  # the model's own forward, not the sampler
            return (f"approximate: the model's forward depends on the rows batched with it (a row alone against in a "
                    f"batch: log-prob gap {alone:.2g}; sampler gap {gap:.2g})")
        if "without a KV cache, one prompt at a time: log-prob gap" in (why_mode or ""):
            # the sequence so far through the model at every step differs from the whole row: a position's output
            # depends on the tokens after it
            return (f"approximate: the model's forward is not causal here (a prefix's last position against the whole "
                    f"row's; sampler gap {gap:.2g})")
        return f"sampler and training forward differ (max log-prob gap {gap:.2g}; {why_mode})"
    paths = ["shared prompt cache" if why is None else f"whole rows: {why}"]
    if why_mode:
        paths.append(f"sampled with {mode.describe()}: {why_mode}")
    return f"ok ({'; '.join(paths)})"


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def table(rows: list[Row]) -> str:
    """The markdown table of docs/models.md, with its summary counts."""
    trainable = [r for r in rows if r.plain == "ok"]
    lines = [f"{len(rows)} causal-LM types; plain transformers + peft trains {len(trainable)}; of those tuneforge "
             f"trains {sum(r.lora == 'ok' for r in trainable)} with LoRA and {sum(r.full == 'ok' for r in trainable)} "
             f"with full weights, packs {sum(r.packing.startswith('exact') for r in trainable)} exactly "
             f"({sum(r.packing == 'exact (per example)' for r in trainable)} with per-example attention, "
             f"{sum(r.packing == 'exact (packed-sequence mask)' for r in trainable)} through transformers' "
             f"packed-sequence mask, {sum(r.packing == 'exact (block mask)' for r in trainable)} with their own "
             f"attention under tuneforge's block mask) and refuses to pack "
             f"{sum(r.packing.startswith('refused') for r in trainable)}; "
             f"{sum(r.head.startswith('full') for r in trainable)} use the full forward for the loss; online RL "
             f"samples and scores {sum(r.rl.startswith('ok') for r in trainable)} exactly and "
             f"{sum(r.rl.startswith('approximate') for r in trainable)} approximately, refuses "
             f"{sum(r.rl.startswith('refused') for r in trainable)} "
             f"({sum(r.rl.startswith('ok (shared prompt cache') for r in trainable)} on each group's shared prompt "
             f"cache, {sum('sampled with' in r.rl for r in trainable)} sampled otherwise than in left-padded batches).",
             "",
             "| type | LoRA | full | packing | head path | attention | online RL |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.plain != "ok":
            lines.append(f"| `{r.model_type}` | plain transformers + peft fails: {_cell(r.plain)} | | | | | |")
            continue
        lines.append(f"| `{r.model_type}` | {_cell(r.lora)} | {_cell(r.full)} | {_cell(r.packing)} | "
                     f"{_cell(r.head)} | {_cell(r.attention)} | {_cell(r.rl)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def read_rows(folder: Path) -> list[Row]:
    """The rows test_sweep.py's tests left, in type order."""
    rows = [Row(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    return sorted(rows, key=lambda r: r.model_type)


def main(argv: list[str]) -> int:
    import tempfile

    write = "--write" in argv
    if "--table" in argv:  # the rows a pytest run left: print the table (and write it with --write)
        text = table(read_rows(Path(argv[argv.index("--table") + 1])))
        print(text)
        if write:
            (REPO / "docs/models.md").write_text(HEADER + text)
        return 0
    types = [a for a in argv if not a.startswith("--")] or CAUSAL_LM_TYPES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in types:
            row = sweep_one(model_type, Path(tmp) / model_type)
            rows.append(row)
            print(f"{model_type:<28} {row.seconds:5.1f}s plain={row.plain[:60]} lora={row.lora[:80]} "
                  f"full={row.full[:60]} packing={row.packing[:40]} head={row.head[:40]}", flush=True)
            for note in row.notes:
                print(note, file=sys.stderr)
    text = table(rows)
    print(text)
    if write:
        (REPO / "docs/models.md").write_text(HEADER + text)
    return 0


HEADER = """# Architectures

Every model type in the installed transformers' causal-LM mapping, as a tiny random model (hidden 64, 2 layers,
the stories260K tokenizer), trained by `tuneforge finetune` for 2 steps with LoRA (all-linear) and with full weights.
A cell reads `ok` when the run's step-0 validation loss equals the next-token loss of the model's own full forward
(transformers' logits, cross-entropy against the next token) on the same examples padded, and its final validation
loss equals that of `final/` reloaded by plain peft (LoRA) or transformers (full). Packing is `exact` when the
packed step-0 loss is that padded loss, with the path that makes it so (tuneforge's per-example attention,
transformers' packed-sequence mask, or the model's own attention under tuneforge's block mask), or refused with the
reason tuneforge gives. Online RL is `ok` when tuneforge's sampler draws completions from the model (KV cache; each
group's prompt cache shared where a forward shows it gives whole rows' log-probs, else whole rows, with the reason;
prompts of different lengths left-padded together with positions from the mask where that changes nothing, else the
first of: positions left to the model, one prompt length at a time, no KV cache) and the
training forward's log-probs of those completions equal the ones recorded while sampling (fp32, 1e-4).
Made by `make models-table` (tests/models/sweep.py); `make test-models` runs the same checks in CI.

"""

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
