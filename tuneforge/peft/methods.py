"""One recipe `peft` entry -> the HF peft config that implements it (every method but `adapter`, which is ours)."""
from __future__ import annotations

from tuneforge.config.schema import PeftConfig

# peft's PeftType value -> tuneforge method name
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
              "PREFIX_TUNING": "prefix_tuning", "ADAPTION_PROMPT": "llama_adapter"}


def build_peft_config(cfg: PeftConfig, model):
    """The peft config for a method peft implements; `model` supplies the depth and the tokenizer path."""
    import peft

    common = {"task_type": "CAUSAL_LM"}
    if cfg.method == "lora":
        return peft.LoraConfig(**common, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               bias=cfg.lora_bias, target_modules=cfg.target_modules, use_dora=cfg.use_dora,
                               use_rslora=cfg.use_rslora, modules_to_save=cfg.modules_to_save)
    if cfg.method == "ia3":
        return peft.IA3Config(**common, target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules,
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
