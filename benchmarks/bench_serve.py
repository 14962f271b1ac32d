"""`tuneforge serve` with concurrent requests against the same requests one at a time.

    python benchmarks/bench_serve.py [--requests 16] [--max-tokens 64] [--torch-threads 1]

Trains a 2-step LoRA adapter on the shipped stories260K model (seconds), starts `tuneforge serve` on it in a
separate process (transformers engine), and sends --requests greedy completions with the official `openai` client:
first one after another, then all at once from as many threads. Prints requests/s and generated tokens/s both ways,
their ratio, and the server's batch count (/health). The server runs with --torch-threads intra-op threads
(OMP_NUM_THREADS): a 260K-parameter model gains nothing from a second one, and on a shared machine a thread that
spin-waits for a busy core makes every decode step many times slower.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "assets/models/stories260K"
PROMPTS = ["Once upon a time, there was a little", "The cat and the dog", "Lily went to the park and",
           "Tom had a big red ball.", "One day, a bird", "The sun was shining and", "Sam wanted to play with",
           "In the forest there lived", "Mom said to Ben:", "The little girl saw a", "A boy named Tim",
           "The fish in the pond", "It was a rainy day and", "The dog found a bone", "Anna liked to draw",
           "The old man had a"]


def train_run(work: Path) -> Path:
    overrides = [f"run.output_dir={work}", "run.name=bench-serve", f"model.name_or_path={STORIES}",
                 "model.dtype=float32", "data.prompt_style=plain", "data.train.limit=16", "data.validation=null", "data.seq_length=128",
                 "train.micro_batch_size=8", "train.global_batch_size=8", "train.max_steps=2", "eval.squad=null",
                 "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=null"]
    subprocess.run([sys.executable, "-m", "tuneforge", "finetune", "-c", str(REPO / "recipes/quickstart.yaml"),
                    *overrides], check=True, cwd=REPO, capture_output=True)
    return work / "bench-serve"


def start_server(run: Path, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--run", str(run), "--port", "0",
                             "--engine", "transformers"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads)))
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def batches(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
        return json.loads(r.read())["batches"]


def measure(client, prompts: list[str], max_tokens: int, threads: int) -> tuple[float, int]:
    """(seconds, generated tokens) for all prompts, `threads` requests in flight at a time."""
    def one(prompt: str) -> int:
        out = client.completions.create(model="bench-serve", prompt=prompt, max_tokens=max_tokens, temperature=0)
        return out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        tokens = sum(pool.map(one, prompts))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's intra-op threads")
    args = parser.parse_args()
    import openai
    import torch
    import transformers

    prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[:args.requests]
    with tempfile.TemporaryDirectory() as tmp:
        run = train_run(Path(tmp))
        proc, url = start_server(run, args.torch_threads)
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            measure(client, prompts[:2], args.max_tokens, 1)  # warm-up
            b0 = batches(url)
            one_s, one_tokens = measure(client, prompts, args.max_tokens, 1)
            b1 = batches(url)
            all_s, all_tokens = measure(client, prompts, args.max_tokens, args.requests)
            b2 = batches(url)
        finally:
            proc.terminate()
            proc.wait()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, openai {openai.__version__}, "
          f"{os.cpu_count()} CPUs, server torch threads {args.torch_threads}, load average {os.getloadavg()[0]:.2f}")
    print(f"{args.requests} greedy completions of up to {args.max_tokens} tokens from stories260K + LoRA")
    print(f"one at a time: {one_s:6.2f} s  {args.requests / one_s:6.2f} requests/s  {one_tokens / one_s:8.1f} "
          f"tokens/s  ({b1 - b0} batches)")
    print(f"all at once:   {all_s:6.2f} s  {args.requests / all_s:6.2f} requests/s  {all_tokens / all_s:8.1f} "
          f"tokens/s  ({b2 - b1} batches)")
    print(f"concurrent / one at a time: {one_s / all_s:.2f}x requests/s, "
          f"{(all_tokens / all_s) / (one_tokens / one_s):.2f}x tokens/s")


if __name__ == "__main__":
    main()
