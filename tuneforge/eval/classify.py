"""Classification scores: validation loss, accuracy and macro-F1, during training and by `tuneforge eval`.

One pass over the validation batches gives the summed cross-entropy and a confusion matrix (summed over ranks), so
the loss is the per-example mean of the whole set and the scores are those of the whole set, not of averages."""
from __future__ import annotations

import torch

from tuneforge.data.classify import prepare_classification_set
from tuneforge.data.loader import build_eval_batches
from tuneforge.distributed import DistEnv, TrainModule, all_reduce_sum, evaluating
from tuneforge.errors import UserError
from tuneforge.models.layers import transformers_model


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 (the unweighted mean over labels of 2PR/(P+R); a label never predicted nor present
    scores 0 and still counts, as scikit-learn's f1_score(average='macro') with zero_division=0 does)."""
    confusion = confusion.double()  # rows: true label, columns: predicted
    hits = confusion.diagonal()
    total = confusion.sum()
    f1 = 2 * hits / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)
    return {"accuracy": float(hits.sum() / total.clamp(min=1)), "macro_f1": float(f1.mean())}


@torch.no_grad()
def validate_classifier(module, batches, precision, env) -> dict:
    """val_loss (mean cross-entropy per example), val_accuracy, val_macro_f1 over all validation sets; with several
    named sets ({name: batches}) also val_loss/<name>, val_accuracy/<name>, val_macro_f1/<name>."""
    num_labels = transformers_model(module).config.num_labels
    named = batches if isinstance(batches, dict) else {"": batches}
    per_set = {}
    with evaluating(module):
        for name, set_batches in named.items():
            loss, confusion = 0.0, torch.zeros(num_labels, num_labels, dtype=torch.long)
            for batch in set_batches:
                with precision.context():
                    total, logits, labels = module({k: v.to(env.device) for k, v in batch.items()}, with_logits=True)
                loss += float(total)
                pairs = labels.cpu() * num_labels + logits.argmax(-1).cpu()
                confusion += torch.bincount(pairs, minlength=num_labels ** 2).view(num_labels, num_labels)
            if env.initialized and env.world_size > 1:  # one collective for the whole matrix
                summed = confusion.to(env.device)
                torch.distributed.all_reduce(summed)
                confusion = summed.cpu()
            per_set[name] = (all_reduce_sum(loss, env), confusion)
    out = set_scores(sum(t for t, _ in per_set.values()), sum(c for _, c in per_set.values()))
    if len(named) > 1:
        for name, (total, confusion) in per_set.items():
            out.update({f"{k}/{name}": v for k, v in set_scores(total, confusion).items()})
    return out


def set_scores(loss_sum: float, confusion: torch.Tensor) -> dict[str, float]:
    scores = scores_from_confusion(confusion)
    return {"val_loss": loss_sum / max(int(confusion.sum()), 1), "val_accuracy": scores["accuracy"],
            "val_macro_f1": scores["macro_f1"]}


def evaluate_classifier(model, tokenizer, data_cfg, sources, precision, batch_size: int) -> dict[str, float]:
    """`tuneforge eval` of a classification run: val_loss, accuracy, macro_f1 of the first set (and per set when
    there are several), with the labels the model was trained on (its config's id2label)."""
    import dataclasses

    config = transformers_model(model).config
    names = [config.id2label[i] for i in range(config.num_labels)]
    results: dict[str, float] = {}
    for i, (name, source) in enumerate(sources):
        if source.format != "classification":
            source = dataclasses.replace(source, format="classification")
        data = prepare_classification_set(data_cfg, [source], tokenizer, names)
        batches = build_eval_batches(data.examples, batch_size, tokenizer.pad_token_id)
        scores = validate_classifier(TrainModule(model), batches, precision, DistEnv(device=str(model.device)))
        model.eval()  # validate_classifier hands the model back in training mode
        scores = {k.removeprefix("val_") if k != "val_loss" else k: v for k, v in scores.items()}
        if i == 0:
            results.update(scores)
        if len(sources) > 1:
            results.update({f"{k}/{name}": v for k, v in scores.items()})
    if not results:
        raise UserError("eval: a classification run needs a validation set or --dataset FILE")
    return results
