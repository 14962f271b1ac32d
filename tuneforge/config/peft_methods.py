"""The PEFT methods tuneforge trains: one `PeftMethod` entry each, and every per-method list derives from them.

What a method is lives here once: its place in an adapter stack, the recipe fields that apply to it, the HF peft
config that implements it and how the recipe's values become that config's arguments, where its parameters sit,
and which model kinds and strategies it supports. The schema (the `peft.method` choices and their help), the recipe
rules (`config/rules/peft.py`), the peft layer, the seq2seq and classifier checks and the fsdp2 check all read it,
so adding a method is one entry here (plus its tests).

Layer 3 (config): plain Python only. The kwargs builders are pure functions of the recipe's `PeftConfig` and a few
facts the peft layer reads off the model (`ModelFacts`); turning them into a peft config object is `peft/methods.py`'s
job.
This module does not import the schema (the schema imports it for the method names), so a builder's `part` is the
schema's PeftConfig by contract, not by annotation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from tuneforge.config.registry import index_by_name

# Where a method sits in a run's adapter stack, innermost first: a weight adapter rewrites layers of the
# transformers model, bottleneck adapters hook the attention and MLP outputs of what is there, a prompt method wraps
# the result and feeds it virtual tokens.
WEIGHTS, BOTTLENECK, PROMPT = 0, 1, 2


@dataclass(frozen=True)
class ModelFacts:
    """What a kwargs builder may know about the model, read off it by the peft layer (this layer has no torch)."""
    name_or_path: str  # where the base model's tokenizer loads from
    num_layers: Optional[int]  # decoder depth (config.num_hidden_layers)
    linear_leaves: tuple[str, ...]  # leaf names of the decoder's linear layers: 'all-linear' without the output layer
    default_feedforward: Optional[tuple[str, ...]]  # peft's IA3 feedforward modules for this architecture, if any


Builder = Callable[[Any, ModelFacts], dict]  # (the recipe's PeftConfig part, facts) -> the peft config's kwargs


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method. A peft-backed method names its PeftType value, its peft config class and its kwargs
    builder; tuneforge's own method (`adapter`) has none of the three."""
    name: str  # the recipe's peft.method
    stage: int  # WEIGHTS, BOTTLENECK or PROMPT: the order a stack of methods is applied in
    fields: tuple[str, ...]  # the PeftConfig fields that apply; set for any other method they are an error
    markers: tuple[str, ...]  # prefixes of the parameter-name parts that hold its trainable weights
    note: str = ""  # what the name alone does not say, in peft.method's help: "lora (also DoRA/rsLoRA)"
    peft_type: Optional[str] = None  # peft's PeftType value, as saved in adapter_config.json
    config_class: Optional[str] = None  # the peft config class, e.g. "LoraConfig"
    kwargs: Optional[Builder] = None
    weight_tuner: bool = False  # rewrites Linear layers as a peft tuner: one per model, or their layers collide
    mergeable: bool = False  # its trained update folds into the base weights
    solo: Optional[str] = None  # why it trains on its own and never in a peft list
    seq2seq: bool = True  # runs on an encoder-decoder model
    classifier: bool = False  # its peft config keeps a sequence classifier's head trainable (modules_to_save)
    fsdp2: bool = True  # distributed.strategy fsdp2 trains and exports it

    def __post_init__(self):
        backed = (self.peft_type is not None, self.config_class is not None, self.kwargs is not None)
        if len(set(backed)) != 1:
            raise ValueError(f"peft method {self.name}: peft_type, config_class and kwargs go together")
        if self.stage not in (WEIGHTS, BOTTLENECK, PROMPT):
            raise ValueError(f"peft method {self.name}: stage {self.stage} is none of WEIGHTS, BOTTLENECK, PROMPT")

    @property
    def prompt_learning(self) -> bool:
        """Prompt methods feed the model virtual tokens: extra inputs, not a change of any layer."""
        return self.stage == PROMPT

    @property
    def peft_backed(self) -> bool:
        return self.peft_type is not None

    @property
    def help(self) -> str:
        return f"{self.name} ({self.note})" if self.note else self.name


def _is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == "all-linear"


def _lora_kwargs(p, facts: ModelFacts) -> dict:
    return {"r": p.lora_rank, "lora_alpha": p.lora_alpha, "lora_dropout": p.lora_dropout, "bias": p.lora_bias,
            "target_modules": p.target_modules, "use_dora": p.use_dora, "use_rslora": p.use_rslora,
            "modules_to_save": p.modules_to_save}


def ia3_modules(p, facts: ModelFacts):
    """IA3 targets as leaf names, with feedforward modules among them. peft expands 'all-linear' to full module
    paths but keeps its default feedforward list as leaf names, and its saved config then fails its own
    "feedforward is a subset of targets" check when plain peft reloads it; leaf names on both sides reload."""
    targets = list(facts.linear_leaves) if _is_all_linear(p.target_modules) else p.target_modules
    feedforward = p.feedforward_modules
    if feedforward is None and facts.default_feedforward is not None:
        feedforward = list(facts.default_feedforward)
        if isinstance(targets, list):
            feedforward = [f for f in feedforward if f in targets]
    return targets, feedforward


def _ia3_kwargs(p, facts: ModelFacts) -> dict:
    targets, feedforward = ia3_modules(p, facts)
    return {"target_modules": targets, "feedforward_modules": feedforward, "modules_to_save": p.modules_to_save}


def _prompt_tuning_kwargs(p, facts: ModelFacts) -> dict:
    init = {"prompt_tuning_init": "RANDOM"}
    if p.prompt_init_text is not None:
        # peft tokenizes the text with the base model's tokenizer and copies those token embeddings
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": p.prompt_init_text,
                "tokenizer_name_or_path": facts.name_or_path}
    return {"num_virtual_tokens": p.num_virtual_tokens, **init}


def _p_tuning_kwargs(p, facts: ModelFacts) -> dict:
    return {"num_virtual_tokens": p.num_virtual_tokens, "encoder_reparameterization_type": p.encoder_type,
            "encoder_hidden_size": p.encoder_hidden_size, "encoder_num_layers": p.encoder_num_layers}


def _prefix_tuning_kwargs(p, facts: ModelFacts) -> dict:
    return {"num_virtual_tokens": p.num_virtual_tokens, "prefix_projection": p.prefix_projection,
            "encoder_hidden_size": p.encoder_hidden_size}


def _llama_adapter_kwargs(p, facts: ModelFacts) -> dict:
    depth = facts.num_layers
    return {"adapter_len": p.adapter_len, "adapter_layers": min(p.adapter_layers or depth, depth)}


_VIRTUAL_TOKENS = ("prompt_encoder",)  # peft keeps every prompt method's virtual tokens in model.prompt_encoder

# The order is the order of the peft.method choices in help texts and error messages.
METHODS: tuple[PeftMethod, ...] = (
    PeftMethod("lora", WEIGHTS, note="also DoRA/rsLoRA",
               fields=("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "use_dora", "use_rslora",
                       "target_modules", "modules_to_save"),
               markers=("lora_", "modules_to_save"), peft_type="LORA", config_class="LoraConfig",
               kwargs=_lora_kwargs, weight_tuner=True, mergeable=True, classifier=True),
    PeftMethod("ia3", WEIGHTS, fields=("target_modules", "modules_to_save", "feedforward_modules"),
               markers=("ia3_", "modules_to_save"), peft_type="IA3", config_class="IA3Config", kwargs=_ia3_kwargs,
               weight_tuner=True, mergeable=True, classifier=True),
    PeftMethod("prompt_tuning", PROMPT, fields=("num_virtual_tokens", "prompt_init_text"), markers=_VIRTUAL_TOKENS,
               peft_type="PROMPT_TUNING", config_class="PromptTuningConfig", kwargs=_prompt_tuning_kwargs),
    PeftMethod("p_tuning", PROMPT, note="prompt encoder",
               fields=("num_virtual_tokens", "encoder_type", "encoder_hidden_size", "encoder_num_layers"),
               markers=_VIRTUAL_TOKENS, peft_type="P_TUNING", config_class="PromptEncoderConfig",
               kwargs=_p_tuning_kwargs),
    PeftMethod("prefix_tuning", PROMPT, fields=("num_virtual_tokens", "encoder_hidden_size", "prefix_projection"),
               markers=_VIRTUAL_TOKENS, peft_type="PREFIX_TUNING", config_class="PrefixTuningConfig",
               kwargs=_prefix_tuning_kwargs),
    # Llama-only (peft's adaption prompt rewrites Llama-style attention), so no seq2seq.
    PeftMethod("llama_adapter", WEIGHTS, note="adaption prompt", fields=("adapter_len", "adapter_layers"),
               markers=("adaption_",), peft_type="ADAPTION_PROMPT", config_class="AdaptionPromptConfig",
               kwargs=_llama_adapter_kwargs, solo="replaces the attention modules", seq2seq=False),
    # tuneforge's own (peft/bottleneck.py): its hooks sit on decoder-only layer stacks (no seq2seq), and fsdp2's
    # export saves one peft model's gathered state, which a bottleneck adapter is not.
    PeftMethod("adapter", BOTTLENECK, note="bottleneck adapters after attention and MLP outputs",
               fields=("bottleneck_size", "bottleneck_activation"), markers=("bottleneck",), seq2seq=False,
               fsdp2=False),
)


# Everything below derives from a tuple of methods, so a test can show that one more entry flows everywhere.

def by_name(methods: tuple[PeftMethod, ...]) -> dict[str, PeftMethod]:
    """{name: method}; a name listed twice is a mistake in the registry."""
    return index_by_name(methods, "peft method")


def names(methods: tuple[PeftMethod, ...], where: Callable[[PeftMethod], bool] = lambda m: True) -> tuple[str, ...]:
    """The names of the methods that satisfy `where`, in registry order (the order messages list them in)."""
    return tuple(m.name for m in methods if where(m))


def field_methods(methods: tuple[PeftMethod, ...]) -> dict[str, tuple[str, ...]]:
    """Which methods each method-specific field applies to; a field set away from its default for another method
    is an error (so a recipe never carries a value that silently does nothing)."""
    fields: dict[str, tuple[str, ...]] = {}
    for m in methods:
        for f in m.fields:
            fields[f] = fields.get(f, ()) + (m.name,)
    return fields


def markers(methods: tuple[PeftMethod, ...]) -> tuple[str, ...]:
    """Every method's parameter-name markers, each once."""
    return tuple(dict.fromkeys(marker for m in methods for marker in m.markers))


def peft_types(methods: tuple[PeftMethod, ...]) -> dict[str, str]:
    """peft's PeftType value -> tuneforge method name, for the peft-backed methods."""
    return {m.peft_type: m.name for m in methods if m.peft_backed}


def method_help(methods: tuple[PeftMethod, ...]) -> str:
    """The help text of peft.method."""
    return (f"PEFT method: {', '.join(m.help for m in methods)}; "
            "a field that does not apply to the method must keep its default")


BY_NAME = by_name(METHODS)
METHOD_NAMES = names(METHODS)
METHOD_HELP = method_help(METHODS)
FIELD_METHODS = field_methods(METHODS)
MARKERS = markers(METHODS)
PEFT_TYPES = peft_types(METHODS)
PROMPT_LEARNING = names(METHODS, lambda m: m.prompt_learning)
WEIGHT_TUNERS = names(METHODS, lambda m: m.weight_tuner)
MERGEABLE = names(METHODS, lambda m: m.mergeable)
SOLO = names(METHODS, lambda m: m.solo is not None)
SEQ2SEQ = names(METHODS, lambda m: m.seq2seq)
CLASSIFIER = names(METHODS, lambda m: m.classifier)
FSDP2 = names(METHODS, lambda m: m.fsdp2)
# a peft tuner rewrites layers that peft's disable_adapter() switches back to the base: the preference reference
REFERENCE_OFF = names(METHODS, lambda m: m.weight_tuner)
