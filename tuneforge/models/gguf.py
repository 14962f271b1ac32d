"""GGUF checkpoints (llama.cpp's format) as a model source.

transformers reads GGUF (`from_pretrained(..., gguf_file=...)`) by dequantizing every tensor, which takes seconds to
minutes, and the model it returns keeps a `quantization_config` that makes `save_pretrained` refuse. tuneforge does
that once per file: it writes the dequantized model (fp32 safetensors, the config without the GGUF quantization
entry, the tokenizer with its chat template) to a cache directory named after the file's content hash, atomically,
and every later step uses that directory as the base model. So `final/adapter_config.json` names a base that plain
peft, transformers and vLLM load as they are."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from tuneforge.config.schema import Config, ModelConfig
from tuneforge.errors import UserError, first_line
from tuneforge.files import atomic_dir, file_sha256

log = logging.getLogger("tuneforge")
SOURCE_FILE = "tuneforge_gguf_source.json"  # beside the cached model: which file it came from


def gguf_origin(model_dir: str) -> dict | None:
    """{"gguf_file", "sha256"} when `model_dir` is tuneforge's cache of a GGUF file; None for a Hub id, a plain
    directory, or a cache since removed."""
    try:
        source = json.loads((Path(model_dir) / SOURCE_FILE).read_text())
        return {"gguf_file": str(source["gguf_file"]), "sha256": str(source["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_gguf_source(m: ModelConfig) -> bool:
    return bool(m.gguf_file) or str(m.name_or_path).lower().endswith(".gguf")


def gguf_cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_GGUF_CACHE") or Path.home() / ".cache" / "tuneforge" / "gguf").expanduser()


def resolve_model_source(cfg: Config) -> Config:
    """The config with a GGUF model source replaced by its cached transformers directory (made on first use);
    any other config as it is."""
    if not is_gguf_source(cfg.model):
        return cfg
    path = gguf_model_dir(cfg.model)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(path), gguf_file=None))


def gguf_model_dir(m: ModelConfig) -> Path:
    gguf_path = locate_gguf(m)
    digest = file_sha256(gguf_path)
    target = gguf_cache_root() / f"{gguf_path.stem}-{digest[:16]}"
    if (target / SOURCE_FILE).is_file():
        return target
    arch = check_gguf_file(gguf_path, m)
    log.warning("model.name_or_path: dequantizing %s (%s) to %s, once", gguf_path.name, arch, target)
    write_dequantized(gguf_path, target, m, digest)
    return target


def locate_gguf(m: ModelConfig) -> Path:
    """The GGUF file on this machine: a local path, a file in a local directory, or one downloaded from a Hub repo."""
    where = f"model.name_or_path: '{m.name_or_path}'"
    if not m.gguf_file:
        path = Path(m.name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"{where}: no such GGUF file")
        return path
    local = Path(m.name_or_path).expanduser()
    if local.is_dir():
        path = local / m.gguf_file
        if not path.is_file():
            raise UserError(f"model.gguf_file: no file '{m.gguf_file}' in the directory '{m.name_or_path}'")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(m.name_or_path, m.gguf_file, revision=m.revision))
    except LocalEntryNotFoundError:
        raise UserError(f"{where}: the Hub file '{m.gguf_file}' is not in the local cache and cannot be downloaded "
                        "(offline?); download it first (hf download) or give a local .gguf path") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{where}: cannot download '{m.gguf_file}' ({first_line(e)})") from None


def check_gguf_file(path: Path, m: ModelConfig) -> str:
    """The file's architecture, once it is known to be a whole GGUF file transformers can read; else one line."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"model.name_or_path: '{path}' is a GGUF file, and reading it needs the gguf package: "
                        "pip install gguf (or pip install 'tuneforge[gguf]')") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(path)  # maps every tensor: a truncated file fails here, before any dequantizing
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as e:  # noqa: BLE001 -- the reader raises ValueError, KeyError, IndexError, struct errors
        raise UserError(f"model.name_or_path: '{path}' is not a readable GGUF file (truncated or corrupt: "
                        f"{first_line(e)})") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"model.name_or_path: '{path}' holds a '{arch}' model, which transformers cannot read from "
                        f"GGUF (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return arch


def write_dequantized(gguf_path: Path, target: Path, m: ModelConfig, digest: str) -> None:
    """Dequantize into a temporary directory beside `target`, then rename it into place: a reader never sees a
    half-written model, and two processes converting the same file at once both end with the same whole one (the
    first to finish; the other's result is dropped, not swapped in under a process that may be reading it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": m.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise UserError(f"model.name_or_path: cannot read a model from '{gguf_path}' ({first_line(e)})") from None
    # The weights are dense fp32 now: nothing of the GGUF quantization is left to describe.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(target, if_absent=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_path.resolve()), "sha256": digest}) + "\n")
    if not (target / SOURCE_FILE).is_file():  # `target` was there already, and is not a conversion of ours
        raise UserError(f"model.name_or_path: the GGUF cache directory '{target}' exists but holds no conversion of "
                        f"'{gguf_path}'; remove it and run again")

