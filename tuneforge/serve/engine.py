"""The transformers engine: one worker thread owns the model and runs the pending requests together through the
same batched generation as `tuneforge generate`, so concurrent requests share decode steps."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from tuneforge.eval.generate import Sampling, generate_tokens

log = logging.getLogger(__name__)

# The requests of a burst arrive within a few milliseconds of each other; waiting this long after the first one
# lets them share its batch, at a cost far below one decode step of even a tiny model.
BATCH_WINDOW_S = 0.005


@dataclass
class Job:
    """One API request: `n` continuations of each prompt (all with the same settings)."""
    prompts: list[str]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    n: int = 1
    add_special_tokens: bool = True  # False when a chat template already wrote the BOS token
    on_text: Callable[[int, str], None] | None = None  # streaming: (choice index, new text) as it is generated
    future: Future = field(default_factory=Future)

    def group_key(self, serial: int) -> tuple:
        """Jobs with equal keys run in one generate call. A seeded job runs alone: its samples must not depend on
        which other requests happened to arrive with it."""
        s = self.sampling
        alone = serial if s.seed is not None and s.temperature > 0 else None
        return (s.temperature, s.top_p, s.top_k, self.stop, self.add_special_tokens, alone)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: int  # generated tokens, the stop string's included


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def settle_choice(tokenizer, tokens: list[int], job: Job) -> Choice:
    """`tokens` end before the eos, so fewer than max_tokens means the model ended the text itself."""
    kept = tokens[:job.max_tokens]
    text, stopped = cut_at_stop(tokenizer.decode(kept, skip_special_tokens=True), job.stop)
    return Choice(text, "stop" if stopped or len(tokens) < job.max_tokens else "length", len(kept))


class RowStreamer:
    """transformers' streamer protocol for a whole batch: turns each decode step's tokens into text deltas for the
    streaming requests. Text that may be the start of a stop string is held back until it is not."""

    def __init__(self, tokenizer, rows: list[tuple[Job, int]]):
        self.tokenizer, self.rows = tokenizer, rows
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.sent = [""] * len(rows)
        self.done = [job.on_text is None for job, _ in rows]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for r, token in enumerate(value.reshape(-1).tolist()):
            job, choice = self.rows[r]
            if self.done[r]:
                continue
            if token == self.tokenizer.eos_token_id or len(self.tokens[r]) >= job.max_tokens:
                self.done[r] = True  # the rest of its text comes from the settled choice
                continue
            self.tokens[r].append(token)
            text, stopped = cut_at_stop(self.tokenizer.decode(self.tokens[r], skip_special_tokens=True), job.stop)
            if not stopped:
                hold = max((len(s) - 1 for s in job.stop), default=0)
                # an incomplete multi-byte character decodes to U+FFFD until its last byte arrives
                text = text[:len(text) - hold].rstrip("\ufffd")
            if text.startswith(self.sent[r]) and len(text) > len(self.sent[r]):
                job.on_text(choice, text[len(self.sent[r]):])
                self.sent[r] = text
            self.done[r] = stopped

    def end(self) -> None:
        pass


class TransformersEngine:
    """Serves a loaded model. `submit` queues a Job and returns its Future (a list of Choice, `n` per prompt, in
    prompt order); the worker drains everything queued, groups it by decoding settings and runs each group as one
    batch (at most `max_batch_rows` continuations)."""

    name = "transformers"

    def __init__(self, model, tokenizer, precision, max_batch_rows: int = 64):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision
        self.max_batch_rows = max_batch_rows
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0}
        self.serial = itertools.count()
        self.worker = threading.Thread(target=self.run, name="tuneforge-engine", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join(timeout=60)

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            time.sleep(BATCH_WINDOW_S)
            pending, stopping = [first], False
            while True:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                pending.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in pending:
                groups.setdefault(job.group_key(next(self.serial)), []).append(job)
            for jobs in groups.values():
                for batch in self.split(jobs):
                    try:
                        self.run_batch(batch)
                    except Exception as e:  # fails this batch's requests, never the worker or the server
                        log.exception("generation failed")
                        for job in batch:
                            if not job.future.done():
                                job.future.set_exception(e)
            if stopping:
                return

    def split(self, jobs: list[Job]) -> list[list[Job]]:
        """Consecutive jobs up to max_batch_rows continuations per batch (a bigger job runs alone)."""
        batches, rows = [[]], 0
        for job in jobs:
            size = len(job.prompts) * job.n
            if batches[-1] and rows + size > self.max_batch_rows:
                batches.append([])
                rows = 0
            batches[-1].append(job)
            rows += size
        return batches

    def run_batch(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        rows = [(job, p * job.n + k, prompt) for job in jobs for p, prompt in enumerate(job.prompts)
                for k in range(job.n)]
        streamer = RowStreamer(self.tokenizer, [(job, c) for job, c, _ in rows]) \
            if any(job.on_text for job in jobs) else None
        lead = jobs[0]
        if lead.sampling.seed is not None:
            torch.manual_seed(lead.sampling.seed)
        # One length for the batch; each job's continuations are cut to its own max_tokens after (decoding is
        # causal, so a row's first k tokens do not depend on how long it goes on).
        max_tokens = max(job.max_tokens for job in jobs)
        generated = generate_tokens(self.model, self.tokenizer, [p for _, _, p in rows], max_tokens,
                                    self.precision, lead.sampling, stop_strings=list(lead.stop) or None,
                                    streamer=streamer, add_special_tokens=lead.add_special_tokens)
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        results: dict[int, list[Choice]] = {id(job): [None] * (len(job.prompts) * job.n) for job in jobs}
        for (job, c, _), tokens in zip(rows, generated):
            choice = settle_choice(self.tokenizer, tokens, job)
            self.stats["generated_tokens"] += choice.tokens
            results[id(job)][c] = choice
        if streamer is not None:
            for r, (job, c, _) in enumerate(rows):
                sent = streamer.sent[r]
                final = results[id(job)][c].text
                if job.on_text is not None and final.startswith(sent) and len(final) > len(sent):
                    job.on_text(c, final[len(sent):])
        for job in jobs:
            job.future.set_result(results[id(job)])
