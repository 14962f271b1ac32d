"""Time the data preparation of a recipe source: first run (read + render + tokenize + write cache) and cached run.

    python benchmarks/bench_data_prep.py --data /work/shared/data/squad_v1.1/train-v1.1.json \\
        --tokenizer /work/shared/models/gpt2-tokenizer --seq-length 512
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="squad")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq-length", type=int, default=512)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    from tuneforge.config.schema import DataConfig, DataSource
    from tuneforge.data import prepare_set

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cache = tempfile.mkdtemp(prefix="tf-bench-cache-")
    data = DataConfig(train=DataSource(path=args.data, format=args.format), seq_length=args.seq_length,
                      cache_dir=cache)
    try:
        for label in ("first run", "cached run"):
            started, cpu = time.perf_counter(), time.process_time()
            prepared = prepare_set(data, [data.train], tok, progress=False)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            s = prepared.sources[0]
            # CPU seconds (all threads) next to wall seconds: on a shared machine the wall time also counts waiting.
            print(f"{label}: {seconds:.2f}s wall, {cpu:.2f}s CPU  ({s.records:,} records -> {s.stats.summary()}; {s.tokens:,} tokens; "
                  f"cached={s.cached})")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}, transformers {transformers.__version__}, tokenizers "
          f"{tokenizers.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
