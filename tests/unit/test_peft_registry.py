"""The PEFT method registry (config/peft_methods.py): every per-method list derives from it, and each entry says
what is true of peft and of tuneforge's code (real config fields, peft classes that accept its kwargs, peft types that
round-trip through a saved adapter, parameter markers, the model kinds and strategies it claims to support)."""
import dataclasses
import re
import subprocess
import sys
import typing

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from tests.conftest import REPO, SQUAD_TRAIN, STORIES
from tuneforge.config import load_config
from tuneforge.config import peft_methods as registry
from tuneforge.config.load import describe_schema
from tuneforge.config.peft_methods import BY_NAME, METHODS, PROMPT, PeftMethod
from tuneforge.config.schema import PeftConfig
from tuneforge.errors import UserError

BASE = {"model": {"name_or_path": str(STORIES)}, "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}}}
# A value away from the default for every method-specific PeftConfig field, all valid together on stories260K (a
# Llama) for the methods they apply to. A new field must be added here (test_every_field_applies_to_some_method).
NON_DEFAULT = {
    "lora_rank": 4, "lora_alpha": 32.0, "lora_dropout": 0.1, "lora_bias": "lora_only",
    "target_modules": ["q_proj", "up_proj", "down_proj"], "use_dora": True, "use_rslora": True,
    "modules_to_save": ["lm_head"], "feedforward_modules": ["up_proj"], "num_virtual_tokens": 5,
    "prompt_init_text": "Answer the question", "encoder_type": "LSTM", "encoder_hidden_size": 32,
    "encoder_num_layers": 1, "prefix_projection": True, "adapter_len": 3, "adapter_layers": 2,
    "bottleneck_size": 4, "bottleneck_activation": "gelu",
}
PEFT_BACKED = [m.name for m in METHODS if m.peft_backed]


def stories():
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def tuned(method: str) -> PeftConfig:
    """The method with every field that applies to it away from its default."""
    return PeftConfig(method=method, **{f: NON_DEFAULT[f] for f in BY_NAME[method].fields})


def recipe(**sections):
    return load_config({**BASE, **sections})


# --- the registry is the one list ---------------------------------------------------------------------------------

def test_schema_literal_and_help_are_the_registry():
    choices = typing.get_args(typing.get_type_hints(PeftConfig)["method"])
    assert choices == registry.METHOD_NAMES == tuple(m.name for m in METHODS)
    help_line = next(line for line in describe_schema() if line.startswith("peft.method: "))
    for m in METHODS:
        assert re.search(rf"\b{m.name}\b", help_line), m.name
    with pytest.raises(UserError, match=r"peft\.method: expected one of " + re.escape("|".join(choices))):
        recipe(peft={"method": "nope"})


def test_every_derived_list_is_the_derivation_of_the_registry():
    """The module's lists are its functions applied to METHODS, and the consumers use those very objects."""
    from tuneforge import peft as peft_layer
    from tuneforge.config.rules import kind, peft as rules
    from tuneforge.config.rules import distributed as strategy_rules
    from tuneforge.peft import fit

    methods = METHODS
    assert registry.BY_NAME == registry.by_name(methods)
    assert registry.FIELD_METHODS == registry.field_methods(methods)
    assert registry.MARKERS == registry.markers(methods)
    assert registry.PEFT_TYPES == registry.peft_types(methods)
    assert registry.METHOD_HELP == registry.method_help(methods)
    for name, flag in [("PROMPT_LEARNING", "prompt_learning"), ("WEIGHT_TUNERS", "weight_tuner"),
                       ("MERGEABLE", "mergeable"), ("SEQ2SEQ", "seq2seq"), ("CLASSIFIER", "classifier"),
                       ("FSDP2", "fsdp2")]:
        assert getattr(registry, name) == registry.names(methods, lambda m: getattr(m, flag)), name
    assert rules.FIELD_METHODS is registry.FIELD_METHODS and rules.WEIGHT_TUNERS is registry.WEIGHT_TUNERS
    assert rules.PROMPT_LEARNING is fit.PROMPT_LEARNING is peft_layer.PROMPT_LEARNING is registry.PROMPT_LEARNING
    assert peft_layer.MARKERS is registry.MARKERS and peft_layer.PEFT_TYPES is registry.PEFT_TYPES
    assert peft_layer.MERGEABLE is registry.MERGEABLE
    assert kind.SEQ2SEQ is registry.SEQ2SEQ and kind.CLASSIFIER is registry.CLASSIFIER
    assert strategy_rules.BY_NAME is registry.BY_NAME


def test_one_more_entry_flows_into_every_list():
    fake = PeftMethod("fake_prompt", PROMPT, fields=("num_virtual_tokens", "prompt_init_text"), markers=("fake_",),
                      note="a test entry", peft_type="FAKE", config_class="PromptTuningConfig",
                      kwargs=lambda p, facts: {}, weight_tuner=True, mergeable=True, solo="is a test",
                      classifier=True, fsdp2=False)
    methods = METHODS + (fake,)
    assert registry.by_name(methods)["fake_prompt"] is fake
    assert registry.names(methods)[-1] == "fake_prompt"
    fields = registry.field_methods(methods)
    assert fields["num_virtual_tokens"] == registry.FIELD_METHODS["num_virtual_tokens"] + ("fake_prompt",)
    assert fields["prompt_init_text"] == ("prompt_tuning", "fake_prompt")
    assert list(fields) == list(registry.FIELD_METHODS)  # no new field: the order of the checks stays
    assert registry.markers(methods) == registry.MARKERS + ("fake_",)
    assert registry.peft_types(methods) == {**registry.PEFT_TYPES, "FAKE": "fake_prompt"}
    assert "fake_prompt (a test entry); a field" in registry.method_help(methods)
    for flag in ("prompt_learning", "weight_tuner", "mergeable", "seq2seq", "classifier"):
        assert "fake_prompt" in registry.names(methods, lambda m: getattr(m, flag)), flag
    assert "fake_prompt" not in registry.names(methods, lambda m: m.fsdp2)
    with pytest.raises(ValueError, match="registered twice"):
        registry.by_name(methods + (fake,))
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(fake, name="half", kwargs=None)


def test_the_registry_and_the_recipe_rules_load_without_torch_or_peft():
    code = ("import sys, tuneforge.config.peft_methods, tuneforge.config.rules.peft, tuneforge.config; "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- each entry is true of the schema -----------------------------------------------------------------------------

def test_every_field_applies_to_some_method():
    schema_fields = {f.name for f in dataclasses.fields(PeftConfig)} - {"method"}
    assert set(registry.FIELD_METHODS) == schema_fields == set(NON_DEFAULT)
    for m in METHODS:
        assert len(set(m.fields)) == len(m.fields) and set(m.fields) <= schema_fields, m.name


def test_each_field_help_names_the_methods_it_applies_to():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(PeftConfig)}
    for field, methods in registry.FIELD_METHODS.items():
        for method in methods:
            assert re.search(rf"\({method}\b|\b{method}\)|, {method}\b", helps[field]), (field, method)


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_a_field_loads_exactly_for_the_methods_it_applies_to(method):
    for field, value in NON_DEFAULT.items():
        if method in registry.FIELD_METHODS[field]:
            assert getattr(recipe(peft={"method": method, field: value}).peft, field) == value
        else:
            with pytest.raises(UserError, match=rf"peft\.{field}: applies to method .*, not {method};"):
                recipe(peft={"method": method, field: value})


# --- each peft-backed entry is true of peft -----------------------------------------------------------------------

def test_peft_types_round_trip_with_peft():
    assert set(registry.PEFT_TYPES) <= {t.value for t in peft.PeftType}
    for value, name in registry.PEFT_TYPES.items():
        assert peft.PeftType(value).value == value and BY_NAME[name].peft_type == value
    assert sorted(registry.PEFT_TYPES.values()) == sorted(PEFT_BACKED)


@pytest.mark.parametrize("method", PEFT_BACKED)
def test_builder_kwargs_are_fields_of_the_peft_config_class_and_reach_it(method):
    from tuneforge.peft.methods import model_facts

    spec, model = BY_NAME[method], stories()
    cls = getattr(peft, spec.config_class)
    assert issubclass(cls, peft.PeftConfig)
    facts = model_facts(model)
    kwargs = spec.kwargs(tuned(method), facts)
    assert set(kwargs) <= {f.name for f in dataclasses.fields(cls)}
    config = cls(task_type="CAUSAL_LM", **kwargs)
    assert config.peft_type == peft.PeftType(spec.peft_type)
    for key, value in kwargs.items():
        got = getattr(config, key)
        assert got == value or (isinstance(value, list) and set(got) == set(value)), key
    default = spec.kwargs(PeftConfig(method=method), facts)
    for field in spec.fields:  # a field that applies to the method changes what peft is given
        assert spec.kwargs(dataclasses.replace(PeftConfig(method=method), **{field: NON_DEFAULT[field]}),
                           facts) != default, field
    peft.get_peft_model(model, config)  # and peft builds it on a real (tiny) model


def test_tuneforge_own_method_names_no_peft_config():
    for m in METHODS:
        if not m.peft_backed:
            assert m.config_class is None and m.kwargs is None and not m.mergeable


# --- each entry is true of tuneforge's own code -------------------------------------------------------------------

@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_markers_name_the_parameters_and_saved_adapters_read_back_the_method(method, tmp_path):
    from tuneforge.peft import apply_peft, check_mergeable, saved_adapters, save_adapters

    model = apply_peft(stories(), tuned(method))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert any(part.startswith(BY_NAME[method].markers) for part in name.split(".")), name
    save_adapters(model, tmp_path, str(STORIES))
    assert saved_adapters(tmp_path) == [(method, tmp_path)]  # the PeftType (or tuneforge's own file) round-trips
    if BY_NAME[method].mergeable:
        check_mergeable(tmp_path)
    else:
        with pytest.raises(UserError, match=f"peft.method {method} cannot be merged into the base weights"):
            check_mergeable(tmp_path)


@pytest.mark.parametrize("method", [m for m in registry.MERGEABLE])
def test_mergeable_methods_merge_to_the_same_logits(method):
    from tuneforge.peft import apply_peft

    model = apply_peft(stories(), PeftConfig(method=method))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = {"input_ids": torch.randint(3, 512, (2, 10))}
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    assert (adapted - stories()(**batch).logits).abs().max() > 1e-3
    assert (merged - adapted).abs().max() < 1e-4, (merged - adapted).abs().max()


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_seq2seq_support_is_what_runs_on_an_encoder_decoder(method, tiny_models):
    from tuneforge.config.rules.kind import check_seq2seq_recipe
    from tuneforge.peft import apply_peft

    cfg = recipe(peft={"method": method})
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models("t5"), dtype=torch.float32)
    if BY_NAME[method].seq2seq:
        check_seq2seq_recipe(cfg)
        apply_peft(model, cfg.peft)
    else:
        with pytest.raises(UserError, match=f"peft.method: {method} does not apply to seq2seq models"):
            check_seq2seq_recipe(cfg)
        with pytest.raises(UserError):  # the rule is there because the method does not fit an encoder-decoder
            apply_peft(model, cfg.peft)


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_classifier_support_keeps_the_head_training(method):
    from tuneforge.config.rules.kind import SEQUENCE_CLASSIFICATION as KIND, check_classification_recipe
    from tuneforge.peft import apply_peft

    raw = {**BASE, "model": {"name_or_path": str(STORIES), "kind": KIND}, "peft": {"method": method},
           "data": {"train": {"path": str(SQUAD_TRAIN), "format": "classification"}}}
    # model.kind auto: the kind rules then wait for the pre-flight's kind, and this test calls them itself
    cfg = load_config({**raw, "model": {"name_or_path": str(STORIES)}}, check_paths=False)
    if not BY_NAME[method].classifier:
        with pytest.raises(UserError, match=f"peft.method: {method} is not supported with sequence_classification"):
            load_config(raw, check_paths=False)  # a recipe that names the kind is refused as it loads
        with pytest.raises(UserError, match=f"peft.method: {method} is not supported with sequence_classification"):
            check_classification_recipe(cfg, KIND)
        return
    check_classification_recipe(cfg, KIND)
    config = AutoConfig.from_pretrained(STORIES, num_labels=3, pad_token_id=0)
    model = apply_peft(AutoModelForSequenceClassification.from_config(config), cfg.peft)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".score." in n for n in trainable) and any(".score." not in n for n in trainable)


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_fsdp2_refuses_exactly_the_methods_it_does_not_train(method):
    from tuneforge.config.rules.distributed import check_strategy_fits

    cfg = recipe(peft={"method": method})
    check_strategy_fits(cfg, "ddp")
    if BY_NAME[method].fsdp2:
        check_strategy_fits(cfg, "fsdp2")
    else:
        with pytest.raises(UserError, match="fsdp2 trains one peft method at a time"):
            check_strategy_fits(cfg, "fsdp2")


def test_lists_stack_by_stage_and_refuse_solo_methods_and_two_of_a_group():
    """Every pair the rules allow trains as one stack, applied innermost first in stage order."""
    from tuneforge.peft import apply_peft, describe_adapters

    for a in METHODS:
        for b in METHODS:
            if a.name == b.name:
                continue
            refused = (a.solo or b.solo or (a.weight_tuner and b.weight_tuner)
                       or (a.prompt_learning and b.prompt_learning))
            peft_list = [{"method": a.name}, {"method": b.name}]
            if refused:
                with pytest.raises(UserError):
                    recipe(peft=peft_list)
                continue
            model = apply_peft(stories(), recipe(peft=peft_list).peft)
            inner_first = [m.name for m in sorted((a, b), key=lambda m: m.stage)]
            assert [line.split(":")[0] for line in describe_adapters(model)] == [f"adapter {m}" for m in inner_first]
