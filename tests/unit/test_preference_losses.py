"""The preference-loss registry (config/preference_losses.py): every per-loss list derives from it, each entry says
what is true of the schema, the recipe rules, the reference a run gets and `pair_losses`, every entry has its torch
function in models/preference.py, and docs/preference.md and the README list the registry's losses."""
import dataclasses
import inspect
import re
import subprocess
import sys
import typing

import pytest
import torch

from tests.conftest import REPO, STORIES
from tuneforge.config import load_config
from tuneforge.config import preference_losses as registry
from tuneforge.config.load import describe_schema
from tuneforge.config.preference_losses import BY_NAME, LOSSES, PreferenceLoss
from tuneforge.config.rules.preference import reference_kind
from tuneforge.config.schema import PreferenceConfig
from tuneforge.errors import UserError
from tuneforge.models import preference as losses_module
from tuneforge.models.preference import LOSS_FUNCTIONS, PairLogps, pair_losses

PAIRS = REPO / "assets/data/squad_pairs/train.jsonl"
BASE = {"model": {"name_or_path": str(STORIES)}, "peft": {"method": "lora"},
        "data": {"train": {"path": str(PAIRS), "format": "preference"}, "seq_length": 256}}
# A valid value away from the default for every loss-specific PreferenceConfig field. A new field of a registry entry
# must be added here (test_every_loss_specific_field_is_a_preference_field).
NON_DEFAULT = {"label_smoothing": 0.1, "simpo_gamma": 1.0}
NAMES = [loss.name for loss in LOSSES]


def recipe(**preference):
    return load_config({**BASE, "preference": preference})


# --- the registry is the one list ---------------------------------------------------------------------------------

def test_schema_literal_and_help_are_the_registry():
    choices = typing.get_args(typing.get_type_hints(PreferenceConfig)["loss_type"])
    assert choices == registry.LOSS_NAMES == tuple(NAMES)
    help_line = next(line for line in describe_schema() if line.startswith("preference.loss_type: "))
    assert help_line.startswith(f"preference.loss_type: {registry.LOSS_HELP} ")
    for loss in LOSSES:
        assert re.search(rf"\b{loss.name}\b", help_line), loss.name
        assert (f"{loss.name} (reference-free" in help_line) == loss.reference_free, loss.name
    with pytest.raises(UserError, match=r"preference\.loss_type: expected one of " + re.escape("|".join(choices))):
        recipe(loss_type="nope")


def test_every_derived_list_is_the_derivation_of_the_registry():
    """The module's lists are its functions applied to LOSSES, and the consumers use those very objects."""
    from tuneforge.config.rules import preference as rules
    from tuneforge.eval import preference as step

    assert registry.BY_NAME == registry.by_name(LOSSES)
    assert registry.FIELD_LOSSES == registry.field_losses(LOSSES)
    assert registry.LOSS_HELP == registry.loss_help(LOSSES)
    assert registry.REFERENCE_FREE == registry.names(LOSSES, lambda loss: loss.reference_free)
    assert registry.WITH_REFERENCE == registry.names(LOSSES, lambda loss: not loss.reference_free)
    assert registry.WITH_SFT == registry.names(LOSSES, lambda loss: loss.sft)
    assert rules.REFERENCE_FREE is registry.REFERENCE_FREE
    assert rules.SMOOTHED is registry.FIELD_LOSSES["label_smoothing"]
    assert step.WITH_SFT is registry.WITH_SFT
    assert losses_module.BY_NAME is registry.BY_NAME
    assert list(LOSS_FUNCTIONS) == NAMES


def test_one_more_entry_flows_into_every_list():
    fake = PreferenceLoss("fake", "fake_loss", note="a test entry", reference_free=True, sft=True,
                          fields=("label_smoothing", "fake_field"))
    losses = LOSSES + (fake,)
    assert registry.by_name(losses)["fake"] is fake
    assert registry.names(losses)[-1] == "fake"
    fields = registry.field_losses(losses)
    assert fields["label_smoothing"] == registry.FIELD_LOSSES["label_smoothing"] + ("fake",)
    assert fields["fake_field"] == ("fake",)
    assert registry.loss_help(losses).endswith(", fake (reference-free, a test entry)")
    for flag in ("reference_free", "sft"):
        assert registry.names(losses, lambda loss, flag=flag: getattr(loss, flag))[-1] == "fake", flag
    with pytest.raises(ValueError, match="registered twice"):
        registry.by_name(losses + (fake,))
    with pytest.raises(ValueError, match="name the same function sigmoid_loss"):
        registry.by_name(losses + (dataclasses.replace(fake, name="twin", function="sigmoid_loss"),))


def test_the_registry_and_the_recipe_rules_load_without_torch():
    code = ("import sys, tuneforge.config.preference_losses, tuneforge.config.rules.preference, tuneforge.config; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- each entry is true of the torch functions --------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_loss_has_its_function_in_models_preference(name):
    function = LOSS_FUNCTIONS[name]
    assert function.__name__ == BY_NAME[name].function
    assert function.__module__ == losses_module.__name__ and inspect.isfunction(function)
    assert list(inspect.signature(function).parameters) == ["x"]


def test_a_missing_function_stops_the_import_with_its_name(monkeypatch):
    monkeypatch.setattr(losses_module, "LOSSES", LOSSES + (PreferenceLoss("fake", "fake_loss"),))
    with pytest.raises(ImportError, match=r"no function for preference loss fake \(fake_loss\)"):
        losses_module._loss_functions()


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(5, 2, generator=g, dtype=torch.float64) * 20 - 0.5
    reference = -torch.rand(5, 2, generator=g, dtype=torch.float64) * 20 - 0.5
    return policy, torch.randint(1, 12, (5, 2), generator=g), reference


@pytest.mark.parametrize("name", NAMES)
def test_pair_losses_read_the_reference_exactly_for_losses_that_have_one(name):
    """A reference-free loss gets per-token log-probs and no reference (its rewards: beta x those); any other loss
    gets the summed log-ratios, depends on the reference, and its rewards are beta x the log-ratios."""
    policy, tokens, reference = tensors()
    beta = 0.3
    p = policy.clone().requires_grad_()
    if BY_NAME[name].reference_free:
        loss, chosen, rejected, logps = pair_losses(name, beta, p, tokens, None)
        assert torch.equal(logps, policy / tokens)
        assert torch.equal(chosen, beta * logps[:, 0].detach()) and torch.equal(rejected, beta * logps[:, 1].detach())
    else:
        loss, chosen, rejected, logps = pair_losses(name, beta, p, tokens, reference)
        assert logps is p
        assert torch.equal(chosen, beta * (policy - reference)[:, 0]) and torch.equal(rejected,
                                                                                    beta * (policy - reference)[:, 1])
        moved = pair_losses(name, beta, policy, tokens, reference + torch.tensor([0.7, -0.4], dtype=torch.float64))[0]
        assert not torch.allclose(moved, loss.detach())
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_a_loss_reads_only_the_fields_that_apply_to_it(name):
    """Changing a loss-specific setting changes exactly the losses it applies to (so the rule that refuses it for the
    others refuses a value that would silently do nothing)."""
    policy, tokens, reference = tensors(1)
    x = PairLogps(policy / tokens if BY_NAME[name].reference_free else policy,
                  None if BY_NAME[name].reference_free else policy - reference, tokens, 0.3, 0.0, 0.5)
    base = LOSS_FUNCTIONS[name](x)
    for field, value in NON_DEFAULT.items():
        moved = LOSS_FUNCTIONS[name](dataclasses.replace(x, **{field: value}))
        assert (not torch.equal(moved, base)) == (field in BY_NAME[name].fields), field


def test_an_unknown_loss_type_is_refused():
    policy, tokens, reference = tensors()
    with pytest.raises(ValueError, match="unknown preference loss_type nope"):
        pair_losses("nope", 0.1, policy, tokens, reference)


# --- each entry is true of the schema and the recipe rules --------------------------------------------------------

def test_every_loss_specific_field_is_a_preference_field():
    schema_fields = {f.name for f in dataclasses.fields(PreferenceConfig)}
    assert set(registry.FIELD_LOSSES) == set(NON_DEFAULT) and set(NON_DEFAULT) <= schema_fields
    assert set(PairLogps.__dataclass_fields__) >= set(NON_DEFAULT)  # what a loss function can read of them
    for loss in LOSSES:
        assert len(set(loss.fields)) == len(loss.fields), loss.name


def test_each_field_help_names_the_losses_it_applies_to():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(PreferenceConfig)}
    for field, losses in registry.FIELD_LOSSES.items():
        for loss in losses:
            assert re.search(rf"\b{loss}\b", helps[field]), (field, loss)
    for field in ("beta", "reference"):  # beta means something for every loss; the reference for some
        for loss in (NAMES if field == "beta" else registry.WITH_REFERENCE):
            assert re.search(rf"\b{loss}\b", helps[field]), (field, loss)


@pytest.mark.parametrize("name", NAMES)
def test_a_field_loads_exactly_for_the_losses_it_applies_to(name):
    for field, value in NON_DEFAULT.items():
        if name in registry.FIELD_LOSSES[field]:
            assert getattr(recipe(loss_type=name, **{field: value}).preference, field) == value
        else:
            with pytest.raises(UserError, match=rf"preference\.{field}: applies to loss_type .*, not {name}; "):
                recipe(loss_type=name, **{field: value})


@pytest.mark.parametrize("name", NAMES)
def test_reference_and_sft_rules_follow_the_entry(name):
    """A reference-free loss gets no reference and refuses one; a loss with its own SFT term refuses rpo_alpha."""
    loss = BY_NAME[name]
    cfg = recipe(loss_type=name)
    assert (reference_kind(cfg, "single") == "none") == loss.reference_free
    if loss.reference_free:
        with pytest.raises(UserError, match=f"preference.reference: loss_type {name} uses no reference model"):
            recipe(loss_type=name, reference="precomputed")
    else:
        assert recipe(loss_type=name, reference="precomputed").preference.reference == "precomputed"
    if loss.sft:
        with pytest.raises(UserError, match=f"preference.rpo_alpha: {name} has its SFT term already"):
            recipe(loss_type=name, rpo_alpha=0.5)
    else:
        assert recipe(loss_type=name, rpo_alpha=0.5).preference.rpo_alpha == 0.5


@pytest.mark.parametrize("name", NAMES)
def test_the_sft_weight_of_a_step_follows_the_entry(name):
    from tuneforge.eval.preference import PreferenceStep

    step = PreferenceStep(PreferenceConfig(loss_type=name), "none")
    assert step.sft_weight == (1.0 if BY_NAME[name].sft else 0.0)


# --- the docs list the registry's losses --------------------------------------------------------------------------

def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_docs_and_readme_list_the_registry_losses():
    doc = (REPO / "docs/preference.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|", section(doc, "The losses"), flags=re.M)
    assert rows == NAMES, "docs/preference.md, The losses: one row per registry entry, in registry order"
    key_row = next(line for line in section(doc, "The `preference` section").splitlines()
                   if line.startswith("| `loss_type` |"))
    assert re.findall(r"`(\w+)`", key_row.split("|")[3]) == NAMES
    beta_row = next(line for line in section(doc, "The `preference` section").splitlines()
                    if line.startswith("| `beta` |"))
    assert all(re.search(rf"\b{name}\b", beta_row) for name in NAMES), beta_row
    free = re.search(r"reference-free losses \(([^)]*)\)", section(doc, "The reference model"))
    assert free and re.findall(r"`(\w+)`", free.group(1)) == list(registry.REFERENCE_FREE)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = next(line for line in section(readme, "Preference tuning: DPO and its family").splitlines()
                if line.startswith("preference: {loss_type: "))
    default = PreferenceConfig().loss_type
    assert f"loss_type: {default}," in line
    also = re.search(r"# also ([\w, ]+);", line).group(1).split(", ")
    assert [default, *also] == NAMES
