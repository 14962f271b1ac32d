"""GGUF export of a finished run, checked through transformers' own GGUF reader (not written by tuneforge).

    make quickstart                      # or any LoRA / full run of a Llama-family or Qwen2 model
    python benchmarks/bench_gguf.py --run runs/quickstart [--quants f16,q8_0,q4_0] [--questions 100]

For each quant type: `tuneforge export --format gguf` (the CLI path), then the file loaded back with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (dequantized to fp32) and compared, in fp32, with the run's
merged model (`tuneforge merge`'s weights, in memory):
  - logits on the first 20 SQuAD prompts (the run's own prompts: chat template, system turn), max |difference|;
  - greedy answers to those 20, how many are the same;
  - SQuAD EM / F1 of greedy answers on the first --questions dev questions (the run's eval settings);
  - the tokenizer transformers rebuilds from the file against the run's tokenizer: ids of the 20 prompts and of a
    text with special tokens.
Also the export's wall time and the file size."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--work", default=None, help="where the .gguf files go (default: a temporary directory)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.cli import main as cli
    from tuneforge.eval.evaluate import build_squad_task, squad_source
    from tuneforge.eval.squad import squad_scores
    from tuneforge.models.load import load_tokenizer, resolve_precision
    from tuneforge.run.load import load_run
    from tuneforge.run.merge import load_merged

    torch.manual_seed(0)
    cfg, final = load_run(args.run)
    tok = load_tokenizer(cfg.model, str(final))
    merged = load_merged(cfg, final).eval()
    fp32 = resolve_precision("float32", "cpu")
    task = build_squad_task(cfg, squad_source(cfg, limit=args.questions), tok, merged)
    first = task.prompts[:20]
    encoded = [tok(p, return_tensors="pt", add_special_tokens=task.add_special_tokens).input_ids for p in first]
    special = f"{tok.eos_token} plain text {tok.bos_token or ''} <|im_start|>user\nhi<|im_end|>\n 12345"

    def logits(model) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(ids).logits[0] for ids in encoded]

    def scores(model) -> tuple[dict, dict]:
        predictions = task.answer(model, tok, fp32)
        return squad_scores(predictions, task.references()), predictions

    reference_logits = logits(merged)
    reference_scores, reference_answers = scores(merged)
    print(f"unexported (merged, fp32): EM {reference_scores['squad_em']:.1f} F1 {reference_scores['squad_f1']:.1f} "
          f"on {len(task.records)} questions")
    ids20 = [r.id for r in task.records[:20]]
    rows = []
    work = Path(args.work or tempfile.mkdtemp(prefix="tuneforge-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    for quant in args.quants.split(","):
        out = work / f"{cfg.run.name}-{quant}.gguf"
        started = time.perf_counter()
        if cli(["export", "--run", args.run, "--format", "gguf", "--quant", quant, "--out", str(out),
                "--overwrite"]) != 0:
            raise SystemExit(f"export {quant} failed")
        seconds = time.perf_counter() - started
        back = AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name, dtype=torch.float32).eval()
        back_tok = AutoTokenizer.from_pretrained(work, gguf_file=out.name)
        diff = max(float((a - b).abs().max()) for a, b in zip(reference_logits, logits(back)))
        s, answers = scores(back)
        same = sum(answers[i] == reference_answers[i] for i in ids20)
        same_ids = all(back_tok(p, add_special_tokens=task.add_special_tokens).input_ids
                       == tok(p, add_special_tokens=task.add_special_tokens).input_ids for p in first)
        same_special = back_tok(special).input_ids == tok(special).input_ids
        rows.append({"quant": quant, "mib": out.stat().st_size / 2**20, "export_s": seconds, "max_logit_diff": diff,
                     "same_greedy_of_20": same, "em": s["squad_em"], "f1": s["squad_f1"],
                     "tokenizer_same_ids": same_ids and same_special})
        print(json.dumps(rows[-1]))
        del back
    print(f"\nrun {args.run}; {len(task.records)} SQuAD dev questions; fp32 on CPU; torch {torch.__version__}")
    print("| file | size MiB | export s | max abs logit diff (20 prompts) | same greedy answer (of 20) | EM | F1 | "
          "tokenizer ids equal |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| unexported (merged) | | | 0 | 20 | {reference_scores['squad_em']:.1f} | "
          f"{reference_scores['squad_f1']:.1f} | |")
    for r in rows:
        print(f"| {r['quant']} | {r['mib']:.1f} | {r['export_s']:.1f} | {r['max_logit_diff']:.2e} | "
              f"{r['same_greedy_of_20']} | {r['em']:.1f} | {r['f1']:.1f} | {r['tokenizer_same_ids']} |")


if __name__ == "__main__":
    main()
