"""The preference section (DPO and its family): its values, the data it trains on, and which reference model a run
gets. `reference_kind` is the one place that decides the reference, for the recipe and for `tuneforge plan`."""
from __future__ import annotations

from tuneforge.config.peft_methods import REFERENCE_OFF
from tuneforge.config.preference_losses import FIELD_LOSSES, REFERENCE_FREE, WITH_SFT
from tuneforge.config.rules.common import check, fail
from tuneforge.config.rules.peft import peft_parts
from tuneforge.config.schema import Config, PreferenceConfig
from tuneforge.config.sources import recipe_sources

SMOOTHED = FIELD_LOSSES["label_smoothing"]  # losses that take label_smoothing


def check_preference(cfg: Config, origin: str | None) -> None:
    pref, sources = cfg.preference, recipe_sources(cfg.data)
    if pref is None:
        bad = next((name for name, src in sources if src.format == "preference"), None)
        check(bad is None, origin, f"{bad}.format: preference data trains with a preference section (e.g. "
                                   "preference: {loss_type: sigmoid, beta: 0.1}); for SFT use a prompt/answer format")
        return
    bad = next((name for name, src in sources if src.format != "preference"), None)
    check(bad is None, origin, f"{bad}.format: the preference section trains on format preference (prompt, chosen "
                               "and rejected per row) in every train and validation source")
    check(pref.beta > 0, origin, f"preference.beta: must be > 0, got {pref.beta}")
    check(0 <= pref.label_smoothing < 0.5, origin,
          f"preference.label_smoothing: expected a value in [0, 0.5), got {pref.label_smoothing}")
    defaults = PreferenceConfig()
    for name, losses in FIELD_LOSSES.items():
        check(pref.loss_type in losses or getattr(pref, name) == getattr(defaults, name), origin,
              f"preference.{name}: applies to loss_type {' or '.join(losses)}, not {pref.loss_type}; remove it or "
              f"leave it at its default ({getattr(defaults, name)!r})")
    check(pref.rpo_alpha is None or pref.rpo_alpha > 0, origin,
          f"preference.rpo_alpha: must be > 0 or null, got {pref.rpo_alpha}")
    check(pref.rpo_alpha is None or pref.loss_type not in WITH_SFT, origin,
          f"preference.rpo_alpha: {pref.loss_type} has its SFT term already (weight 1); leave rpo_alpha null")
    check(pref.simpo_gamma >= 0, origin, f"preference.simpo_gamma: must be >= 0, got {pref.simpo_gamma}")
    check(pref.max_prompt_length is None or 1 <= pref.max_prompt_length < cfg.data.seq_length, origin,
          f"preference.max_prompt_length: expected 1 .. data.seq_length - 1 ({cfg.data.seq_length - 1}) or null, "
          f"got {pref.max_prompt_length}")
    if pref.loss_type in REFERENCE_FREE and pref.reference != "auto":
        fail(origin, f"preference.reference: loss_type {pref.loss_type} uses no reference model; leave reference "
                     "at auto")
    check(not cfg.data.train_on_inputs, origin,
          "data.train_on_inputs: a preference loss compares completions; the prompt is never a target")
    check(cfg.data.val_split is None, origin,
          "data.val_split: preference runs take held-out pairs from data.validation (a preference file)")
    if pref.reference == "adapter_off":
        reference_kind(cfg, "single", origin)  # the strategy-free reasons it cannot be; fsdp2 is checked later


def reference_kind(cfg: Config, strategy: str, origin: str | None = None) -> str:
    """none (a reference-free loss), adapter_off (the trained adapter switched off: the base model, no copy) or
    precomputed (the starting model's log-probs, one pass before training). adapter_off is right only when the
    adapter is the one thing that trains and the run starts from the base: with full weights there is nothing to
    switch off, under fsdp2 the adapter's layers are sharded units a second forward would gather again, and after
    model.init_from the starting model is that run's, which switching its adapter off would not give."""
    pref = cfg.preference
    if pref is None or pref.loss_type in REFERENCE_FREE:
        return "none"
    why = adapter_off_obstacle(cfg)
    if why is None and strategy == "fsdp2":
        why = "is not available under fsdp2 (the reference runs a second forward of sharded units)"
    if pref.reference == "adapter_off" and why:
        fail(origin, f"preference.reference: adapter_off {why}; use precomputed (auto picks it)")
    if pref.reference == "precomputed" or why:
        return "precomputed"
    return "adapter_off"


def adapter_off_obstacle(cfg: Config) -> str | None:
    """Why switching the adapter off would not give the starting model (a reference of a preference or RL run), or
    None where it does: the adapter is the one thing that trains, and the run starts from the base."""
    parts = peft_parts(cfg.peft)
    if len(parts) != 1 or parts[0].method not in REFERENCE_OFF:
        trains = " + ".join(p.method for p in parts) if parts else "full weights"
        return f"needs one adapter of {', '.join(REFERENCE_OFF)} (this run trains {trains})"
    if cfg.train.trainable is not None:
        return "needs the adapter alone to train (train.trainable also trains base weights)"
    if cfg.model.init_from:
        return "would give the base model, not the model.init_from run the training starts from"
    return None
