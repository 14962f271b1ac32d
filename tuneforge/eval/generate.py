"""Generation from prompts: batched, KV-cached, greedy or sampled (a finished run loads through run/load.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from tuneforge.distributed import detect_env, inner_model
from tuneforge.errors import UserError
from tuneforge.models.classify import is_classifier
from tuneforge.models.load import resolve_precision
from tuneforge.models.seq2seq import is_encoder_decoder


@dataclass
class Sampling:
    """Decoding settings: temperature 0 (the default) is greedy; otherwise sample with optional top-p / top-k."""
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # seeds torch right before generating: same seed, prompts and batches = same samples

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        kwargs = {"do_sample": True, "temperature": self.temperature}
        kwargs["top_p"] = self.top_p if self.top_p is not None else 1.0
        kwargs["top_k"] = self.top_k if self.top_k is not None else 0  # 0 = no top-k filter
        return kwargs


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             precision=None, stop_at_newline: bool = False, sampling: Sampling | None = None,
             add_special_tokens: bool = True, synced_gpus: bool = False) -> list[str]:
    """Batched generation with KV cache and left padding (greedy unless `sampling` says otherwise); returns only
    the new text of each prompt (for an encoder-decoder, what its decoder wrote). With `stop_at_newline` an answer
    is its first line after leading whitespace (a model that opens with a newline still answers). `synced_gpus`
    (transformers' option, for sharded weights) keeps this rank stepping until every rank's batch is done."""
    if sampling is not None and sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    outputs = []
    for i in range(0, len(prompts), batch_size):
        rows = generate_tokens(model, tokenizer, prompts[i:i + batch_size], max_new_tokens, precision, sampling,
                               stop_at_newline=stop_at_newline, add_special_tokens=add_special_tokens,
                               synced_gpus=synced_gpus)
        for row in rows:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.lstrip().split("\n")[0].strip() if stop_at_newline else text)
    return outputs


class AnswerLineEnds(StoppingCriteria):
    """transformers stopping criterion: a row is done once its new text, leading whitespace aside, holds a newline
    (a short answer is one line; an instruct model often opens its turn with a newline before it)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.start = tokenizer, None

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.start is None:  # first call: one token past the prompt
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], device=input_ids.device)


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int, precision=None,
                    sampling: Sampling | None = None, stop_strings: list[str] | None = None, streamer=None,
                    add_special_tokens: bool = True, stop_at_newline: bool = False,
                    synced_gpus: bool = False) -> list[list[int]]:
    """One batch: the new token ids of each prompt, up to (not including) its eos. Left padding keeps every
    prompt's last token at the same column, so one decode step serves the whole batch. `stop_strings` end a row
    early (the stop text itself is generated; callers cut it); `streamer` gets each step's tokens (transformers'
    BaseStreamer protocol). Seeding is the caller's: a seed covers all the batches it makes. `model` may be the
    training loop's TrainModule, whose generate gathers FSDP2's root weights; its inner model answers the rest."""
    inner = inner_model(model)
    if is_classifier(inner):
        raise UserError("generate: this run trained a sequence classifier, which predicts labels, not text; score "
                        "it with `tuneforge eval --run DIR` (accuracy, macro-F1)")
    precision = precision or resolve_precision("float32", detect_env().device)
    decoding = (sampling or Sampling()).generate_kwargs()
    if stop_strings:
        decoding.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if stop_at_newline:  # a row ends at a newline after its first text, not at one it opens with
        decoding["stopping_criteria"] = [AnswerLineEnds(tokenizer)]
    tokenizer.padding_side = "left"  # harmless for an encoder-decoder: its attention mask hides the padding
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(inner.device)
    with precision.context():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True, **decoding, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced_gpus)
    rows = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # a causal LM returns prompt + new tokens; an encoder-decoder only its decoder's (after the start token)
    for row in out[:, 1 if is_encoder_decoder(inner) else enc["input_ids"].shape[1]:].tolist():
        # A finished row (eos or stop string) is filled with pad tokens until the longest row ends.
        row = row[:row.index(eos)] if eos in row else row
        while row and row[-1] == pad:
            row.pop()
        rows.append(row)
    return rows
