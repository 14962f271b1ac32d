"""Hand a finished run to a serving engine. vLLM loads a plain HF model directory, or a base model plus a PEFT
adapter with --enable-lora; both come straight from final/ (the merged directory is `tuneforge merge`'s)."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.models.seq2seq import is_seq2seq_output
from tuneforge.run.load import is_adapter, load_run
from tuneforge.run.merge import merge_run

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
