"""The vLLM engine is vLLM's own OpenAI server: `tuneforge serve` builds its command line (the base model with the
run's LoRA adapter as a LoRA module, or the fully fine-tuned model) and hands the process over to it."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.export import vllm_args
from tuneforge.peft import saved_adapters


def vllm_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module object without a spec (e.g. a stub in sys.modules)
        return False


def vllm_servable(final: Path) -> str | None:
    """None when vLLM can serve the run's final/ as it is, else why not. vLLM applies plain LoRA adapters only."""
    adapters = saved_adapters(final)
    if not adapters:
        return None
    if len(adapters) > 1 or adapters[0][0] != "lora":
        return f"vLLM serves LoRA adapters only, and this run holds {'+'.join(m for m, _ in adapters)}"
    if json.loads((final / "adapter_config.json").read_text()).get("use_dora"):
        return "vLLM does not serve DoRA adapters"
    return None


def vllm_serve_command(cfg, final: Path, host: str, port: int, chat_template: str | None = None) -> list[str]:
    """`vllm serve` for a run: the served model is named after the run either way, so clients ask for the same
    `model` whichever engine answers. The API key goes through VLLM_API_KEY, not the command line, which other
    users of the machine can read."""
    name = cfg.run.name
    if (final / "adapter_config.json").is_file():
        rank = json.loads((final / "adapter_config.json").read_text()).get("r")
        command = vllm_args(final, name, adapter=final, base=cfg.model.name_or_path, rank=rank)
    else:
        command = vllm_args(final, name)
    command += ["--host", host, "--port", str(port)]
    if chat_template:
        command += ["--chat-template", chat_template]
    return command


def check_vllm(final: Path) -> None:
    """`--engine vllm` asked for explicitly: every reason it cannot run, as one line."""
    import torch

    if not vllm_installed():
        raise UserError("--engine vllm: vLLM is not installed: pip install vllm (Linux with a CUDA GPU), or use "
                        "--engine transformers")
    if not torch.cuda.is_available():
        raise UserError("--engine vllm: no CUDA GPU is visible; use --engine transformers")
    reason = vllm_servable(final)
    if reason:
        raise UserError(f"--engine vllm: {reason}; merge it first (tuneforge export --format vllm) or use "
                        "--engine transformers")
    if shutil.which("vllm") is None:
        raise UserError("--engine vllm: the `vllm` command is not on PATH (is vLLM's environment active?)")


def use_vllm(final: Path) -> bool:
    """--engine auto: vLLM when it is installed, a GPU is present and it can serve this run as it is."""
    import torch

    return vllm_installed() and torch.cuda.is_available() and vllm_servable(final) is None and \
        shutil.which("vllm") is not None
