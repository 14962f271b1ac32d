"""The preference losses tuneforge trains (DPO and its family): one `PreferenceLoss` entry each, and every per-loss
list derives from them.

What a loss is lives here once: its name (the recipe's preference.loss_type), whether it reads a reference model,
whether it has an SFT term of its own, the PreferenceConfig fields that apply to it alone, its help text, and the
name of its torch function. The schema (the loss_type choices and their help), the recipe rules
(`config/rules/preference.py`), the reference a run gets, the SFT weight of a step and `pair_losses`
(`models/preference.py`) all read it, so adding a loss is one entry here, its function in models/preference.py
(found there by `function`), and its tests.

Layer 3: plain Python only, no torch. This module does not import the schema (the schema imports it for the loss
names), so a field name in `fields` is a PreferenceConfig field by contract, checked by a test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tuneforge.config.registry import index_by_name


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference loss. A reference-free loss compares the policy with itself, on each completion's log-probs
    averaged per token (SimPO, ORPO), and its rewards are beta x those averages; any other loss reads the reference's
    log-probs too, summed over each completion as the policy's are, and its rewards are beta x (log pi - log ref)."""
    name: str  # the recipe's preference.loss_type (TRL's loss_type of the same formula, where TRL has one)
    function: str  # the name of its torch function in models/preference.py: (PairLogps) -> loss per pair
    note: str = ""  # what the name alone does not say, in loss_type's help: "sigmoid (DPO)"
    reference_free: bool = False  # reads no reference model: no reference pass, preference.reference stays auto
    sft: bool = False  # adds the SFT loss of the chosen completion itself (weight 1), so rpo_alpha does not apply
    fields: tuple[str, ...] = ()  # the PreferenceConfig fields that apply to this loss and not to every loss

    @property
    def help(self) -> str:
        parts = (["reference-free"] if self.reference_free else []) + ([self.note] if self.note else [])
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


# The order is the order of the loss_type choices in help texts, error messages and docs/preference.md.
LOSSES: tuple[PreferenceLoss, ...] = (
    PreferenceLoss("sigmoid", "sigmoid_loss", note="DPO; conservative DPO with label_smoothing",
                   fields=("label_smoothing",)),
    PreferenceLoss("ipo", "ipo_loss", note="on per-token log-ratios"),
    PreferenceLoss("hinge", "hinge_loss", note="SLiC"),
    PreferenceLoss("robust", "robust_loss", note="DPO with label_smoothing as the rate of flipped labels",
                   fields=("label_smoothing",)),
    PreferenceLoss("bco_pair", "bco_pair_loss", note="each side's reward against 0, as TRL 1.16's bco_pair"),
    PreferenceLoss("simpo", "simpo_loss", note="length-normalised, target margin simpo_gamma", reference_free=True,
                   fields=("simpo_gamma",)),
    PreferenceLoss("orpo", "orpo_loss", note="SFT on chosen + beta x odds-ratio term", reference_free=True,
                   sft=True),
)


# Everything below derives from a tuple of losses, so a test can show that one more entry flows everywhere.

def by_name(losses: tuple[PreferenceLoss, ...]) -> dict[str, PreferenceLoss]:
    """{name: loss}; a name or a function listed twice is a mistake in the registry."""
    index = index_by_name(losses, "preference loss")
    owners: dict[str, str] = {}
    for loss in losses:
        if loss.function in owners:
            raise ValueError(f"preference losses {owners[loss.function]} and {loss.name} name the same function "
                             f"{loss.function}")
        owners[loss.function] = loss.name
    return index


def names(losses: tuple[PreferenceLoss, ...],
          where: Callable[[PreferenceLoss], bool] = lambda loss: True) -> tuple[str, ...]:
    """The names of the losses that satisfy `where`, in registry order (the order messages list them in)."""
    return tuple(loss.name for loss in losses if where(loss))


def field_losses(losses: tuple[PreferenceLoss, ...]) -> dict[str, tuple[str, ...]]:
    """Which losses each loss-specific field applies to; a field set away from its default for another loss is an
    error (so a recipe never carries a value that silently does nothing)."""
    fields: dict[str, tuple[str, ...]] = {}
    for loss in losses:
        for f in loss.fields:
            fields[f] = fields.get(f, ()) + (loss.name,)
    return fields


def loss_help(losses: tuple[PreferenceLoss, ...]) -> str:
    """The help text of preference.loss_type."""
    return f"preference loss: {', '.join(loss.help for loss in losses)}"


BY_NAME = by_name(LOSSES)
LOSS_NAMES = names(LOSSES)
LOSS_HELP = loss_help(LOSSES)
FIELD_LOSSES = field_losses(LOSSES)
REFERENCE_FREE = names(LOSSES, lambda loss: loss.reference_free)  # losses of the policy alone
WITH_REFERENCE = names(LOSSES, lambda loss: not loss.reference_free)  # losses that read a reference model
WITH_SFT = names(LOSSES, lambda loss: loss.sft)  # losses with an SFT term on the chosen completion of their own
