"""Encoder-decoder (T5) fine-tuning: a tiny T5 trained with full SFT and with LoRA on the shipped SQuAD sample, then
scored, prompted, reloaded in plain peft and merged; the loss normalisation under accumulation; the batch layout."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN, read_metrics, tiny_overrides, train_losses
from tests.tiny_recipes import one_torch_thread  # noqa: F401 (autouse)
from tuneforge import cli
from tuneforge.config import load_config
from tuneforge.data.seq2seq import Seq2SeqCollator
from tuneforge.data.tokenize import IGNORE, Example
from tuneforge.train.recipe import finetune


def _finetune(recipe, out, name, *extra):
    """A 20-step fp32 run on 8 SQuAD questions (memorised, so greedy answers are more than spaces)."""
    with pytest.MonkeyPatch.context() as mp:  # the HTML report's plots are tested elsewhere
        mp.setattr("tuneforge.train.recipe.write_report", lambda run_dir: run_dir / "report.html")
        finetune(load_config(recipe, tiny_overrides(
            out, name, f"model.name_or_path={recipe.parent / 't5'}", "data.train.limit=8", "data.seq_length=128",
            "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=20",
            "train.lr_scheduler.name=constant", f"data.validation.path={SQUAD_DEV}", "data.validation.format=squad",
            "data.validation.limit=4", *extra)))
    return out / name


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    (root / "t5").symlink_to(tiny_models("t5"))
    recipe = root / "t5.yaml"
    recipe.write_text(f"model: {{name_or_path: {root / 't5'}, kind: auto}}\n"
                      "peft: {method: lora, lora_rank: 8, lora_alpha: 16, target_modules: all-linear}\n"
                      f"data: {{train: {{path: {SQUAD_TRAIN}, format: squad}}}}\n")
    return {"model": root / "t5", "recipe": recipe, "out": root,
            "full": _finetune(recipe, root, "full", "peft=null", "train.optimizer.lr=0.01"),
            "lora": _finetune(recipe, root, "lora", "train.optimizer.lr=0.03", "eval.squad.limit=2",
                              "eval.squad.max_new_tokens=4")}


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _dev_batch(tokenizer):
    from tuneforge.data.records import load_records
    from tuneforge.data.tokenize import tokenize_records

    records = load_records(str(SQUAD_DEV), "squad", 3)
    examples, _ = tokenize_records(records, tokenizer, "Context: {context} Question: {question} Answer:", 96)
    return Seq2SeqCollator(tokenizer.pad_token_id, 0)(examples)


def test_full_and_lora_runs_learn_and_save_hf_outputs(runs):
    from transformers import AutoModelForSeq2SeqLM

    from tuneforge.hub import build_model_card
    from tuneforge.models.layers import decoder_layers

    for name in ("full", "lora"):
        losses = train_losses(runs[name])
        assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, (name, losses)
    full = AutoModelForSeq2SeqLM.from_pretrained(runs["full"] / "final")
    assert full.config.architectures == ["T5ForConditionalGeneration"]
    # FSDP2 shards (and compile compiles) the encoder's and the decoder's blocks one by one
    assert decoder_layers(full) == [*full.encoder.block, *full.decoder.block]
    adapter = json.loads((runs["lora"] / "final/adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert set(adapter["target_modules"]) == {"q", "k", "v", "o", "wi", "wo"}  # all-linear: no lm_head
    card = build_model_card(runs["lora"])
    assert "pipeline_tag: text2text-generation" in card and "AutoPeftModelForSeq2SeqLM.from_pretrained" in card
    squad_rows = [r for r in read_metrics(runs["lora"]) if "squad_f1" in r]
    assert [r["step"] for r in squad_rows] == [20] and all(0 <= r["squad_f1"] <= 100 for r in squad_rows)


def test_eval_scores_squad_and_loss(runs):
    assert cli.main(["eval", "--run", str(runs["lora"]), "--dataset", str(SQUAD_TRAIN), "--limit", "4"]) == 0
    scores = json.loads((runs["lora"] / "eval/scores.json").read_text())
    assert 0 <= scores["squad_em"] <= 100 and 0 <= scores["squad_f1"] <= 100 and scores["squad_questions"] == 4
    assert scores["perplexity"] == pytest.approx(math.exp(scores["val_loss"]))
    predictions = json.loads((runs["lora"] / "eval/squad_predictions.json").read_text())
    assert len(predictions) == 4 and all(isinstance(p, str) for p in predictions.values())


def test_generate_answers_one_per_prompt(runs, tmp_path, capsys):
    rows = [{"context": "Paris is the capital of France.", "question": "What is the capital of France?"},
            {"prompt": "Context: The sky is blue. Question: What colour is the sky? Answer:"},
            {"input": "Context: Ice is cold. Question: Is ice hot? Answer:"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "--run", str(runs["full"]), "--max-new-tokens", "8"]
    assert cli.main([*args, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 0
    outputs = [json.loads(line)["output"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(outputs) == 3 and all(o.strip() for o in outputs), outputs
    capsys.readouterr()
    assert cli.main([*args, "--prompt", "Context: A cat sat. Question: Who sat? Answer:", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"].strip()


def test_adapter_reloads_in_plain_peft_and_merges(runs, tmp_path):
    """Plain peft on the saved adapter reproduces the training run's last validation loss (so it is the in-memory
    model that was saved), tuneforge's loaded model gives the same logits, and merging changes them by rounding
    only."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from tuneforge.data import build_eval_batches, prepare_source
    from tuneforge.data.seq2seq import build_seq2seq_collator
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.loss import count_label_tokens
    from tuneforge.models.loss import seq2seq_loss
    from tuneforge.run.model import load_run_model
    from tuneforge.run.merge import merge_run

    final = runs["lora"] / "final"
    plain = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(runs["model"]), str(final)).eval()
    cfg = load_config(runs["lora"] / "config.yaml", check_paths=False)
    tokenizer = load_tokenizer(cfg.model, str(final))
    data = prepare_source(cfg.data, cfg.data.validation, tokenizer)
    batches = build_eval_batches(data.examples, 4, tokenizer.pad_token_id,
                                 collate_fn=build_seq2seq_collator(plain.config, tokenizer))
    with torch.no_grad():
        loss = sum(float(seq2seq_loss(plain, b)) for b in batches) / sum(count_label_tokens(b) for b in batches)
    assert loss == pytest.approx(read_metrics(runs["lora"])[-1]["val_loss"], rel=1e-6)

    ours, _, _ = load_run_model(runs["lora"])
    batch = _dev_batch(tokenizer)
    with torch.no_grad():  # per-token mean = transformers' own loss over the same labels
        mean = float(seq2seq_loss(ours, batch)) / count_label_tokens(batch)
        assert mean == pytest.approx(float(ours(**batch).loss), rel=1e-6)
    assert torch.equal(_logits(ours, batch), _logits(plain, batch))
    merged = AutoModelForSeq2SeqLM.from_pretrained(merge_run(runs["lora"], tmp_path / "merged"))
    assert torch.allclose(_logits(merged, batch), _logits(plain, batch), atol=1e-5)


def test_accumulation_gives_the_loss_of_the_bigger_batch(runs):
    """micro 2 x accumulation 2 = micro 4: the step loss is the token sum over both micro-batches divided by the
    step's label tokens, so the losses (and, through the updates, the second step's) agree."""
    common = ["peft=null", "train.optimizer.lr=0.01", "train.max_steps=2", "data.validation=null"]
    big = _finetune(runs["recipe"], runs["out"], "big", *common)
    accum = _finetune(runs["recipe"], runs["out"], "accum", *common, "train.micro_batch_size=2")
    assert train_losses(accum) == pytest.approx(train_losses(big), rel=1e-5)
    assert [r["label_tokens"] for r in read_metrics(accum)] == [r["label_tokens"] for r in read_metrics(big)]


def test_collator_splits_prompt_to_encoder_and_labels_to_decoder():
    # prompt [5, 6, 7]; decoder [8, 9, 2] with 9 unlabelled (e.g. a later user turn of a chat)
    a = Example([5, 6, 7, 8, 9, 2], [IGNORE, IGNORE, IGNORE, 8, IGNORE, 2])
    b = Example([5, 6, 3], [IGNORE, IGNORE, 3])
    out = Seq2SeqCollator(pad_id=0, decoder_start_id=1, encoder_eos=2)([a, b])
    assert out["input_ids"].tolist() == [[5, 6, 7, 2], [5, 6, 2, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["decoder_input_ids"].tolist() == [[1, 8, 9], [1, 0, 0]]
    assert out["decoder_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[8, IGNORE, 2], [3, IGNORE, IGNORE]]
    from tuneforge.data import count_input_tokens
    from tuneforge.models.loss import count_label_tokens

    assert count_label_tokens(out) == 3 and count_input_tokens(out) == 11
