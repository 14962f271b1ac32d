"""One recipe `peft` entry -> the HF peft config that implements it (every method but `adapter`, which is ours)."""
from __future__ import annotations

import dataclasses

from tuneforge.config.schema import PeftConfig

# peft's PeftType value -> tuneforge method name
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
              "PREFIX_TUNING": "prefix_tuning", "ADAPTION_PROMPT": "llama_adapter"}


def build_peft_config(cfg: PeftConfig, model):
    """The peft config for a method peft implements; `model` supplies the depth and the tokenizer path."""
    import peft

    from tuneforge.models.classify import head_target_modules, is_classifier
    from tuneforge.models.seq2seq import peft_task_type

    common = {"task_type": peft_task_type(model)}
    if is_classifier(model):  # peft then trains and saves the head in full (modules_to_save: score / classifier)
        common = {"task_type": "SEQ_CLS"}
        cfg = dataclasses.replace(cfg, target_modules=head_target_modules(cfg, model))
    if cfg.method == "lora":
        return peft.LoraConfig(**common, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               bias=cfg.lora_bias, target_modules=cfg.target_modules, use_dora=cfg.use_dora,
                               use_rslora=cfg.use_rslora, modules_to_save=cfg.modules_to_save)
    if cfg.method == "ia3":
        targets, feedforward = resolve_ia3_modules(cfg, model)
        return peft.IA3Config(**common, target_modules=targets, feedforward_modules=feedforward,
                              modules_to_save=cfg.modules_to_save)
    if cfg.method == "prompt_tuning":
        init = {"prompt_tuning_init": "RANDOM"}
        if cfg.prompt_init_text is not None:
            # peft tokenizes the text with the base model's tokenizer and copies those token embeddings
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": cfg.prompt_init_text,
                    "tokenizer_name_or_path": model.name_or_path}
        return peft.PromptTuningConfig(**common, num_virtual_tokens=cfg.num_virtual_tokens, **init)
    if cfg.method == "p_tuning":
        return peft.PromptEncoderConfig(**common, num_virtual_tokens=cfg.num_virtual_tokens,
                                        encoder_reparameterization_type=cfg.encoder_type,
                                        encoder_hidden_size=cfg.encoder_hidden_size,
                                        encoder_num_layers=cfg.encoder_num_layers)
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(**common, num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.prefix_projection,
                                       encoder_hidden_size=cfg.encoder_hidden_size)
    if cfg.method == "llama_adapter":
        depth = model.config.num_hidden_layers
        return peft.AdaptionPromptConfig(**common, adapter_len=cfg.adapter_len,
                                         adapter_layers=min(cfg.adapter_layers or depth, depth))
    raise ValueError(f"peft has no method {cfg.method}")


def linear_leaf_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder ('all-linear' without the output layer)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and m is not head})


def resolve_ia3_modules(cfg: PeftConfig, model):
    """IA3 targets as leaf names, with feedforward modules among them. peft expands 'all-linear' to full module
    paths but keeps its default feedforward list as leaf names, and its saved config then fails its own
    "feedforward is a subset of targets" check when plain peft reloads it; leaf names on both sides reload."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    targets = cfg.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = linear_leaf_names(model)
    feedforward = cfg.feedforward_modules
    if feedforward is None:
        feedforward = FEEDFORWARD.get(model.config.model_type)
        if feedforward is not None and isinstance(targets, list):
            feedforward = [f for f in feedforward if f in targets]
    return targets, feedforward
