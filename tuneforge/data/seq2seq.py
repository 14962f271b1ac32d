"""Batches for encoder-decoder (seq2seq) models, from the same tokenized examples as a causal LM.

An example is stored once, as prompt + completion + eos with the completion's tokens labelled (tokenize.py), so the
tokenized cache serves both kinds and cannot mix them up: the split happens here. Tokens before the first label go
to the encoder (`input_ids`, plus the eos a T5-style tokenizer ends every input with); the rest is the decoder
side: `labels` holds them (-100 on unlabelled ones, e.g. later user turns of a chat) and `decoder_input_ids` is the
same sequence shifted right behind the model's decoder start token. data.seq_length therefore bounds encoder plus
decoder tokens of an example, the budget it sets for prompt plus answer of a causal LM.

Labels are not shifted against the decoder inputs, so every label counts (see models/seq2seq.py)."""
from __future__ import annotations

import torch

from tuneforge.data.tokenize import IGNORE, Example


def split_example(ex: Example, encoder_eos: int | None) -> tuple[list[int], list[int], list[int]]:
    """(encoder ids, decoder ids, decoder labels) of one stored example."""
    boundary = next((k for k, label in enumerate(ex.labels) if label != IGNORE), len(ex.labels))
    encoder = list(ex.input_ids[:boundary]) + ([encoder_eos] if encoder_eos is not None else [])
    return encoder, list(ex.input_ids[boundary:]), list(ex.labels[boundary:])


class Seq2SeqCollator:
    """Examples -> input_ids / attention_mask (encoder, right-padded to the longest or to `width`) and
    decoder_input_ids / decoder_attention_mask / labels (right-padded to the longest target)."""

    def __init__(self, pad_id: int, decoder_start_id: int, encoder_eos: int | None = None, width: int | None = None):
        self.pad_id, self.start, self.encoder_eos, self.width = pad_id, decoder_start_id, encoder_eos, width

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        parts = [split_example(ex, self.encoder_eos) for ex in batch]
        n_enc = max(self.width or 0, max(len(e) for e, _, _ in parts))
        n_dec = max(1, max(len(d) for _, d, _ in parts))
        out = {"input_ids": torch.full((len(batch), n_enc), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), n_enc), dtype=torch.long),
               "decoder_input_ids": torch.full((len(batch), n_dec), self.pad_id, dtype=torch.long),
               "decoder_attention_mask": torch.zeros((len(batch), n_dec), dtype=torch.long),
               "labels": torch.full((len(batch), n_dec), IGNORE, dtype=torch.long)}
        for i, (encoder, decoder, labels) in enumerate(parts):
            out["input_ids"][i, :len(encoder)] = torch.tensor(encoder, dtype=torch.long)
            out["attention_mask"][i, :len(encoder)] = 1
            if decoder:
                out["decoder_input_ids"][i, :len(decoder)] = torch.tensor([self.start] + decoder[:-1])
                out["decoder_attention_mask"][i, :len(decoder)] = 1
                out["labels"][i, :len(labels)] = torch.tensor(labels)
        return out


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer ends every encoded text with eos (T5's does; the encoder saw inputs that way)."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1:] == [eos]


def build_seq2seq_collator(config, tokenizer, batching: str = "pad_longest", seq_length: int | None = None):
    """The collator of an encoder-decoder model, given its transformers config (models.seq2seq.model_config); None
    for any other model (the caller keeps its own)."""
    if not getattr(config, "is_encoder_decoder", False):
        return None
    start = config.decoder_start_token_id
    if start is None:
        start = tokenizer.pad_token_id
    return Seq2SeqCollator(tokenizer.pad_token_id, start, tokenizer.eos_token_id if appends_eos(tokenizer) else None,
                           seq_length if batching == "pad_to_max_length" else None)
