"""Hand a finished run to a serving engine. vLLM loads a plain HF model directory, or a base model plus a PEFT
adapter with --enable-lora; both come straight from final/ (the merged directory is `tuneforge merge`'s).
llama.cpp, Ollama and LM Studio load one GGUF file (`--format gguf`), or a base
GGUF with a GGUF LoRA (`--format gguf-lora`); the file format is models/gguf_export.py."""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

from transformers import AutoConfig

from tuneforge.errors import UserError
from tuneforge.files import atomic_file, write_atomic
from tuneforge.models import gguf_export as g
from tuneforge.models import ollama as o
from tuneforge.models.gguf import gguf_origin, resolve_model_source
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.models.seq2seq import is_seq2seq_output
from tuneforge.peft import check_mergeable, saved_adapters
from tuneforge.peft.fit import check_adapters_fit
from tuneforge.run.load import is_adapter, load_run
from tuneforge.run.merge import load_merged, merge_run

# vLLM accepts these values for --max-lora-rank; the adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def check_out(out: Path) -> None:
    """`--out` may be new or an empty directory; it is created only when something is written into it, so a run
    that cannot be exported leaves nothing behind."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")


def vllm_args(out: Path, name: str, adapter: Path | None = None, base: str | None = None,
              rank: int | None = None) -> list[str]:
    """`vllm serve` for a model directory, or for a base model with a LoRA adapter served as module `name`."""
    if adapter is None:
        return ["vllm", "serve", str(out.resolve()), "--served-model-name", name]
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= (rank or 8)), VLLM_LORA_RANKS[-1])
    return ["vllm", "serve", str(base), "--enable-lora", "--lora-modules", f"{name}={adapter.resolve()}",
            "--max-lora-rank", str(max_rank)]


def vllm_command(out: Path, name: str, adapter: Path | None = None, base: str | None = None,
                 rank: int | None = None) -> str:
    return shlex.join(vllm_args(out, name, adapter, base, rank))


def export_vllm(run_dir: str | Path, out: str | Path, keep_adapter: bool = False) -> str:
    """Write the run's model to `out` for vLLM and return the `vllm serve` command that serves it."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, final = load_run(run_dir)
    name = cfg.run.name
    if is_seq2seq_output(final):
        raise UserError(f"export --format vllm: {final} holds an encoder-decoder (seq2seq) model, which vLLM does not "
                        "serve; `tuneforge merge` writes a full model that transformers loads")
    if keep_adapter and not is_adapter(final):
        raise UserError(f"--keep-adapter: {final} holds a full fine-tune, not an adapter; export it without "
                        "--keep-adapter")
    check_out(out)
    if keep_adapter:
        adapter = out / "adapter"
        shutil.copytree(final, adapter, dirs_exist_ok=True)
        adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
        return vllm_command(out, name, adapter, adapter_cfg.get("base_model_name_or_path"), adapter_cfg.get("r"))
    if is_adapter(final):
        # the one merge path: a QLoRA run merges into a full-precision reload of its base, never into 4-bit weights
        merge_run(run_dir, out)
    else:
        shutil.copytree(final, out, dirs_exist_ok=True)
    return vllm_command(out, name)


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f16", overwrite: bool = False,
                ollama: bool = False, lora: bool = False) -> str:
    """Write the run's model (an adapter merged first, through the one merge path) or, with `lora`, its LoRA adapter
    as GGUF; with `ollama` a Modelfile beside it. Returns what to print: notes, the file, the commands to run it."""
    run_dir, out = Path(run_dir), Path(out)
    cfg, final = load_run(run_dir)
    fmt = "gguf-lora" if lora else "gguf"
    if is_seq2seq_output(final) or cfg.model.kind not in ("auto", "causal_lm"):
        raise UserError(f"export --format {fmt}: {final} is not a causal LM; GGUF export covers decoder-only models")
    g.check_request(out, quant, overwrite, lora)
    modelfile = out.parent / "Modelfile" if ollama else None
    if ollama and lora:
        raise UserError("--ollama: goes with --format gguf (an Ollama model is one file; for an adapter, a Modelfile "
                        "names the base GGUF with FROM and this file with ADAPTER)")
    if modelfile is not None and modelfile.exists() and not overwrite:
        raise UserError(f"--ollama: {modelfile} exists; pass --overwrite to replace it")
    base_dir = _base_dir(cfg)
    origin = _origin_gguf(base_dir)
    adapter = bool(saved_adapters(final))
    if lora and not is_adapter(final):
        what = "adapters of another kind" if adapter else "a full fine-tune"
        raise UserError(f"--format gguf-lora: {final} holds {what}, not one LoRA adapter; use --format gguf")
    where = f"{base_dir}/config.json" if adapter else f"{final}/config.json"
    config = (_config_dict(base_dir, cfg.model.trust_remote_code) if adapter
              else _json_file(final / "config.json"))
    g.model_type_of(config, where)  # before any weights load
    if any(not a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise UserError(f"{where}: {', '.join(config['architectures'])} is not a causal LM; GGUF export covers "
                        "decoder-only language models")
    if lora:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            layers = g.write_gguf_lora(tmp, final, config, quant, cfg.run.name)
        base = str(origin) if origin else "BASE.gguf"
        lines = [f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): a GGUF LoRA of {layers} layers, {quant}"]
        if origin is None:
            lines.append(f"BASE.gguf: the run's base model ({base_dir}) as GGUF, e.g. from llama.cpp's converter")
        return "\n".join(lines + g.usage_lines(out, cfg.run.name, None, lora_base=base))

    model, tokenizer = _merged_or_full(cfg, final)
    config = model.config.to_dict()
    try:  # the chat format also names the end-of-turn token llama.cpp stops at
        chat = o.chat_format(tokenizer)
    except UserError:
        if ollama:
            raise
        chat = None
    eot = None
    if chat is not None and chat[0] != "plain":
        eot = tokenizer.convert_tokens_to_ids(chat[2][-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        notes = g.write_gguf(tmp, model.state_dict(), config, tokenizer, quant, cfg.run.name,
                             origin_pre=_origin_pre(origin), eot_id=eot)
    lines = [f"note: {n}" for n in notes]
    lines.append(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant})")
    if modelfile is not None:
        fmt_name, template, stops, system = chat
        if cfg.data.prompt_style == "chat" and cfg.data.system_prompt:
            system = cfg.data.system_prompt  # the system turn the run trained with
        write_atomic(modelfile, o.modelfile_text(out.name, template, stops, system))
        lines.append(f"wrote {modelfile} ({fmt_name} template, stop {', '.join(stops)})")
    return "\n".join(lines + g.usage_lines(out, cfg.run.name, modelfile))


def _merged_or_full(cfg, final: Path):
    """The run's model in fp32 (an adapter merged into a full-precision base) and its tokenizer."""
    tokenizer = load_tokenizer(cfg.model, str(final))
    if saved_adapters(final):
        check_mergeable(final)
        check_adapters_fit(cfg.model, final)
        return load_merged(cfg.model, final), tokenizer
    return load_model(dataclasses.replace(cfg.model, quantization=None), str(final)), tokenizer


def _base_dir(cfg) -> str:
    return resolve_model_source(cfg).model.name_or_path


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the model's config ({e})") from None


def _config_dict(model_dir: str, trust_remote_code: bool) -> dict:
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).to_dict()


def _origin_gguf(model_dir: str) -> Path | None:
    """The GGUF file a base model came from (tuneforge's cache of it), if it is still there."""
    origin = gguf_origin(model_dir)
    path = Path(origin["gguf_file"]) if origin else None
    return path if path is not None and path.is_file() else None


def _origin_pre(origin: Path | None) -> str | None:
    """tokenizer.ggml.pre of the GGUF file the base came from: llama.cpp's own name for its pre-tokenizer."""
    if origin is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(origin)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None
