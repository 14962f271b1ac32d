"""Parameter-efficient fine-tuning with HF peft as the engine."""
from __future__ import annotations

from tuneforge.config.schema import PeftConfig
from tuneforge.errors import UserError


def apply_peft(model, cfg: PeftConfig):
    """Wrap the model with the configured adapter; only the adapter's parameters stay trainable."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias, target_modules=cfg.target_modules)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"peft.target_modules: {cfg.target_modules!r} does not fit this model ({first})") from None


def adapter_summary(model) -> str:
    """Where the trainable parameters sit, by module leaf name (e.g. 'lora_A, lora_B on q_proj, v_proj')."""
    hosts, kinds = set(), set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            kind = next((x for x in parts if x.startswith("lora_")), None)
            if kind:
                kinds.add(kind)
                hosts.add(parts[parts.index(kind) - 1])
            else:
                hosts.add(parts[-2] if len(parts) > 1 else parts[0])
    return (", ".join(sorted(kinds)) + " on " if kinds else "") + ", ".join(sorted(hosts))
