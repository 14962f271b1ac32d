"""Publish a run on the Hugging Face Hub: final/ as it is (transformers / peft load it from the Hub directly) and
a model card generated from the run (base model, data, recipe, scores). Secrets never reach the card: the recipe
is redacted again here, and the token is only handed to huggingface_hub."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from tuneforge.config.load import _redact
from tuneforge.config.rules.peft import method_label
from tuneforge.errors import UserError, first_line
from tuneforge.models.gguf import gguf_origin
from tuneforge.models.seq2seq import is_seq2seq_output
from tuneforge.run.load import load_run
from tuneforge.run.scores import read_scores

SCORE_KEYS = ("val_loss", "perplexity", "squad_em", "squad_f1")


def _card_config(run_dir: Path) -> dict:
    return _redact(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})


def _data_lines(config: dict) -> list[str]:
    data = config.get("data", {})
    lines = []
    for role in ("train", "validation"):
        value = data.get(role)
        for src in value if isinstance(value, list) else [value] if value else []:
            limit = f", first {src['limit']} examples" if src.get("limit") else ""
            lines.append(f"- {role}: `{Path(str(src.get('path', ''))).name}` ({src.get('format', '?')}{limit})")
    return lines


def _scores_table(run_dir: Path) -> list[str]:
    rows = [(label, read_scores(run_dir, base)) for label, base in (("base model", True), ("fine-tuned", False))]
    rows = [(label, s) for label, s in rows if s]
    if not rows:
        return ["No evaluation recorded yet (`tuneforge eval --run DIR`)."]
    keys = [k for k in SCORE_KEYS if any(k in s for _, s in rows)]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, s in rows:
        cells = [f"{s[k]:.2f}" if isinstance(s.get(k), (int, float)) else "" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _base_label(base: str) -> str:
    """The base as a reader of the card knows it: a GGUF file's name and hash, not tuneforge's local cache path."""
    origin = gguf_origin(base)
    if origin is None:
        return f"`{base}`"
    return (f"`{Path(origin['gguf_file']).name}` (a GGUF file, sha256 `{origin['sha256']}`, dequantized to fp32 by "
            "tuneforge)")


def build_model_card(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    config = _card_config(run_dir)
    base = str(config.get("model", {}).get("name_or_path", ""))
    peft = config.get("peft")
    is_local = base.startswith(("/", ".", "~")) or Path(base).exists()
    seq2seq = is_seq2seq_output(run_dir / "final")
    meta = {"library_name": "peft" if peft else "transformers",
            "pipeline_tag": "text2text-generation" if seq2seq else "text-generation",
            "tags": ["tuneforge"] + (["lora"] if peft else [])}
    if base and not is_local:
        meta["base_model"] = base  # only a Hub id links the card to its base model page
    method = method_label(peft)
    name = config.get("run", {}).get("name", run_dir.name)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"Fine-tuned from {_base_label(base)} with tuneforge: {method}.", ""]
    if peft:
        auto = "AutoPeftModelForSeq2SeqLM" if seq2seq else "AutoPeftModelForCausalLM"
        lines += ["```python", f"from peft import {auto}", f"model = {auto}.from_pretrained(\"<this repo>\")",
                  "```", ""]
    lines += ["## Data", "", *(_data_lines(config) or ["- (not recorded)"]), "", "## Scores", "",
              *_scores_table(run_dir), "", "## Recipe", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def hub_token() -> str:
    """The token huggingface_hub would use; one clear error when there is none or the Hub is switched off."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError("push: the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set); unset it to upload")
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise UserError("push needs huggingface_hub: pip install huggingface_hub") from None
    token = get_token()
    if not token:
        raise UserError("push: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN")
    return token


def push_run(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    run_dir = Path(run_dir)
    _, final = load_run(run_dir)
    token = hub_token()
    card = build_model_card(run_dir)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=str(p.relative_to(final)), path_or_fileobj=str(p))
                  for p in sorted(final.rglob("*")) if p.is_file() and p.name != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, operations, commit_message=f"tuneforge: upload run {run_dir.name}")
    except HfHubHTTPError as e:
        raise UserError(f"push {repo_id}: the Hub refused ({first_line(e)})") from None
    except (OSError, ValueError, *_network_errors()) as e:  # no network, DNS, proxy
        raise UserError(f"push {repo_id}: cannot reach the Hugging Face Hub ({first_line(e)})") from None
    return str(url)


def _network_errors() -> tuple[type, ...]:
    """The HTTP client's transport errors (huggingface_hub moved from requests to httpx and httpx2)."""
    import importlib

    errors = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors.append(getattr(mod, "HTTPError", None) or mod.RequestException)
    return tuple(e for e in errors if isinstance(e, type))
