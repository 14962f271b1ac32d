"""model.kind: sequence_classification: what trains, the scores, and outputs that plain transformers / peft load.

The data (tests/fixtures/classify_*.jsonl) labels short sentences animal / food / weather by their last word, so a
head on the last token's hidden state learns it in a few steps: accuracy must rise well above chance (1/3)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, STORIES, read_metrics, tiny_overrides
from tests.tiny_recipes import one_torch_thread, skip_report_plots  # noqa: F401 (autouse)
from tuneforge.api import evaluate, finetune
from tuneforge.errors import UserError

TRAIN = REPO / "tests/fixtures/classify_train.jsonl"
VAL = REPO / "tests/fixtures/classify_validation.jsonl"
LABELS = ["animal", "food", "weather"]
RECIPE = {"model": {"name_or_path": str(STORIES)}}  # every other value comes from overrides()


@pytest.fixture(scope="module", autouse=True)
def no_report_plots():
    with pytest.MonkeyPatch.context() as mp:
        skip_report_plots(mp)
        yield


def overrides(out: Path, name: str, model: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"run.name={name}", f"model.name_or_path={model}", "model.dtype=float32",
            "peft=null", f"data.train={{path: {TRAIN}, format: classification}}",
            f"data.validation={{path: {VAL}, format: classification}}", "data.seq_length=32",
            "train.micro_batch_size=16", "train.global_batch_size=16", "train.max_steps=8", "train.optimizer.lr=0.01",
            "train.val_every_steps=null", "logging.tensorboard=false", "logging.progress=false",
            "checkpoint.every_steps=null", *extra]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random LlamaForSequenceClassification saved from a config, without a pad token (as Llama ships)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("classifier")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    return out


def plain_scores(model, tokenizer) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on the validation file, batched with the tokenizer's padding."""
    rows = [json.loads(line) for line in VAL.read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = model(**enc).logits
    return (float(torch.nn.functional.cross_entropy(logits, labels)),
            int((logits.argmax(-1) == labels).sum()) / len(rows))


def test_head_only_run_trains_the_head_and_final_loads_in_plain_transformers(tiny_classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = finetune(RECIPE,
                   overrides(tmp_path, "head", tiny_classifier, "train.trainable={head: true}"))
    rows = [r for r in read_metrics(run) if "val_accuracy" in r]
    assert [r["step"] for r in rows] == [0, 8]
    assert rows[-1]["val_accuracy"] >= 0.8 > rows[0]["val_accuracy"] + 0.3
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]

    before, after = load_file(tiny_classifier / "model.safetensors"), load_file(run / "final/model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["score.weight"]  # the backbone is bit for bit the checkpoint's

    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.pad_token_id == tokenizer.pad_token_id
    loss, accuracy = plain_scores(model, tokenizer)
    assert loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5) and accuracy == rows[-1]["val_accuracy"]
    tokenizer.padding_side = "left"  # transformers pools the last non-pad token: either padding side
    assert plain_scores(model, tokenizer)[0] == pytest.approx(loss, rel=1e-4)


def test_lora_with_an_mlp_head_on_a_causal_lm(tmp_path):
    """A pretrained causal LM gets a new MLP head (model.kind explicit); LoRA trains the backbone, the head trains
    in full (peft modules_to_save). eval, merge and plain transformers (trust_remote_code) agree with training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.run.merge import merge_run

    run = finetune(RECIPE, overrides(
        tmp_path, "mlp", STORIES, "model.kind=sequence_classification", "model.head={hidden_layers: [32], dropout: 0}",
        "peft={method: lora, lora_rank: 4, lora_alpha: 8}", "train.max_steps=6"))
    last = [r for r in read_metrics(run) if "val_accuracy" in r][-1]
    assert last["val_accuracy"] >= 0.8

    saved = load_file(run / "final/adapter_model.safetensors")
    assert {k.split(".")[3] if ".lora_" not in k else "lora" for k in saved} == {"lora", "1", "4"}  # score.1/.4

    scores = evaluate(run)
    assert scores["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert (scores["accuracy"], scores["macro_f1"]) == (last["val_accuracy"], last["val_macro_f1"])
    assert json.loads((run / "eval/scores.json").read_text())["accuracy"] == scores["accuracy"]

    merged = merge_run(run, tmp_path / "merged")
    model = AutoModelForSequenceClassification.from_pretrained(merged, trust_remote_code=True).eval()
    assert type(model).__name__ == "MLPHeadLlamaForSequenceClassification"
    loss, accuracy = plain_scores(model, AutoTokenizer.from_pretrained(merged))
    assert loss == pytest.approx(last["val_loss"], rel=1e-5) and accuracy == last["val_accuracy"]

    with pytest.raises(UserError, match="predicts labels, not text"):
        from tuneforge.api import generate

        generate(run, "a big dog")


def test_lora_final_loads_with_plain_peft(tiny_classifier, tmp_path):
    """A LoRA run's final/ holds the adapter and the classifier's config.json: plain transformers + peft rebuild it."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    run = finetune(RECIPE, overrides(tmp_path, "lora", tiny_classifier, "train.max_steps=2",
                                     "peft={method: lora, lora_rank: 4, lora_alpha: 8}"))
    last = [r for r in read_metrics(run) if "val_loss" in r][-1]
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_classifier, config=AutoConfig.from_pretrained(run / "final"))
    model = PeftModel.from_pretrained(base, run / "final").eval()
    loss, accuracy = plain_scores(model, AutoTokenizer.from_pretrained(run / "final"))
    assert loss == pytest.approx(last["val_loss"], rel=1e-5) and accuracy == last["val_accuracy"]


def test_loss_is_per_example_over_the_whole_step(tiny_classifier, tmp_path):
    """Micro-batch 8 x accumulation 2 gives micro-batch 16's loss and gradient (padding differs, logits do not)."""
    runs = [finetune(RECIPE,
                     overrides(tmp_path, f"m{micro}", tiny_classifier, f"train.micro_batch_size={micro}",
                               "train.max_steps=1", "data.validation=null"))
            for micro in (16, 8)]
    (one,), (two,) = ([r for r in read_metrics(run) if "loss" in r] for run in runs)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


def test_classifier_starts_from_a_full_causal_lm_run(tmp_path):
    """init_from a full run's final/: its backbone goes under a new head; the causal LM's own head has no place."""
    lm = finetune(RECIPE, tiny_overrides(tmp_path, "lm", "peft=null", "train.max_steps=1", "data.train.limit=8",
                                         "data.seq_length=128"))
    run = finetune(RECIPE, overrides(tmp_path, "cls", STORIES, "model.kind=sequence_classification",
                                     f"model.init_from={lm}", "train.trainable={head: true}", "train.max_steps=1"))
    source, final = load_file(lm / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    backbone = [k for k in source if k.startswith("model.")]
    assert backbone and all(torch.equal(source[k], final[k]) for k in backbone)
    assert not torch.equal(load_file(STORIES / "model.safetensors")["model.norm.weight"], final["model.norm.weight"])


def test_label_ids_truncation_and_macro_f1(tok):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.classify import encode_rows, label_names
    from tuneforge.eval.classify import scores_from_confusion

    data = DataConfig()
    assert label_names(data, [("f:1", "a", 2), ("f:2", "b", 0)]) == ["0", "1", "2"]  # ids index 0..max
    assert label_names(data, [("f:1", "a", "food"), ("f:2", "b", "animal")]) == ["animal", "food"]
    with pytest.raises(UserError, match="f:2: labels mix names and integer ids"):
        label_names(data, [("f:1", "a", "food"), ("f:2", "b", 1)])
    with pytest.raises(UserError, match="f:1: label id 3 is outside 0..2"):
        encode_rows([("f:1", "a dog", 3)], ["a", "b", "c"], tok, 32, "auto")

    text = "Lily saw the big brown dog in the park"
    ids = tok(text)["input_ids"]
    for truncation, kept in (("auto", ids[:5]), ("left", ids[:1] + ids[-4:])):
        table, stats = encode_rows([("f:1", text, "b")], ["a", "b"], tok, 5, truncation)
        assert table[0].input_ids == kept and table[0].labels == [-100] * 4 + [1] and stats.truncated == 1
    with pytest.raises(UserError, match="no example left"):
        encode_rows([("f:1", text, "b")], ["a", "b"], tok, 5, "drop")

    # true label by row, prediction by column: F1 of label 0 = 2*2/(3+2), of 1 = 2*1/(1+3), of 2 (never predicted) = 0;
    # scikit-learn's f1_score(average="macro", zero_division=0) gives the same 0.4333
    scores = scores_from_confusion(torch.tensor([[2, 1, 0], [0, 1, 0], [0, 1, 0]]))
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
