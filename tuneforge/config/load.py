"""Load a YAML recipe into the typed schema: dotted overrides, strict types, "did you mean", one-line errors."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tuneforge.config.schema import Config, DataConfig, DataSource
from tuneforge.errors import UserError
from tuneforge.files import write_atomic

_SECRET = re.compile(r"token(?!s|izer)|key|secret|password", re.IGNORECASE)  # max_new_tokens is a count


def load_config(source: str | os.PathLike | dict | Config | None = None, overrides: list[str] | None = None,
                world_size: int = 1, check_paths: bool = True) -> Config:
    """Build a validated Config from a YAML path, a dict or a Config, then apply `key.sub=value` overrides."""
    if isinstance(source, Config):
        raw, origin, text = dataclasses.asdict(source), "<config>", None
    elif isinstance(source, dict):
        raw, origin, text = copy.deepcopy(source), "<dict>", None
    elif source is None:
        raw, origin, text = {}, "<defaults>", None
    else:
        origin = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{origin}: no such recipe file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{origin}: cannot read recipe ({e.__class__.__name__}: {e})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{origin}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{origin}: a recipe must be a mapping of sections (run, model, data, ...), got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = _build(Config, raw, "")
    except _FieldError as e:
        line = _line_of(text, e.path) if text else None
        where = f"{origin}:{line}" if line else origin
        raise UserError(f"{where}: {e.path}: {e.message}") from None
    validate(cfg, world_size, origin, check_paths)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, true/false, null, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{item}': expected key.sub=value")
    parts = key.strip().split(".")
    node, i = raw, 0
    while i < len(parts) - 1:
        part, child = parts[i], node.get(parts[i])
        if isinstance(child, list):  # a list of sections (peft: [...]): address an item by its index, peft.0.x
            index = parts[i + 1]
            if (i + 2 >= len(parts) or not index.isdigit() or int(index) >= len(child)
                    or not isinstance(child[int(index)], dict)):
                raise UserError(f"override '{item}': {'.'.join(parts[:i + 1])} is a list of {len(child)}; "
                                f"address an item as {'.'.join(parts[:i + 1])}.N.<key>")
            child = child[int(index)]
            i += 1
        elif not isinstance(child, dict):
            child = node[part] = {}
        node, i = child, i + 1
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node[parts[-1]] = Override(value, parsed)


class Override:
    """A command-line value: parsed as YAML, except where the schema wants a string (run.name=007 stays '007')."""

    def __init__(self, text: str, parsed: Any):
        self.text, self.parsed = text, parsed

    def resolve(self, tp: Any) -> Any:
        return self.text if tp is str else self.parsed


class _FieldError(Exception):
    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


def _describe(value: Any) -> str:
    return f"{value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise _FieldError(prefix.rstrip(".") or "<top>", f"expected a mapping of fields, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; expected one of: {', '.join(fields)}"
            raise _FieldError(path, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if (value.parsed if isinstance(value, Override) else value) is None:
            if type(None) in options:
                return None
            raise _FieldError(path, "must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except _FieldError as e:
                if _same_shape(value.parsed if isinstance(value, Override) else value, option):
                    raise  # a mapping for a dataclass, a list for a list: that option's own error is the precise one
                errors.append(e.message)
        raise _FieldError(path, " or ".join(dict.fromkeys(errors)))
    if isinstance(value, Override):
        value = value.resolve(tp)
    if value is None:
        raise _FieldError(path, f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise _FieldError(path, f"expected one of {'|'.join(map(str, choices))}, got {_describe(value)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(path, f"expected a list, got {_describe(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{path}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _FieldError(path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _FieldError(path, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _FieldError(path, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _FieldError(path, f"expected a string, got {_describe(value)}")
    return value


def _same_shape(value: Any, tp: Any) -> bool:
    return ((isinstance(value, dict) and dataclasses.is_dataclass(tp))
            or (isinstance(value, list) and typing.get_origin(tp) is list))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _line_of(text: str, path: str) -> int | None:
    """1-based line of a dotted path in the YAML text (the deepest key that exists), for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for key, val in node.value:
            if key.value == part:
                line, node = key.start_mark.line + 1, val
                break
        else:
            break
    return line


def _check(ok: bool, origin: str, message: str) -> None:
    if not ok:
        raise UserError(f"{origin}: {message}")


def validate(cfg: Config, world_size: int = 1, origin: str = "<config>", check_paths: bool = True) -> None:
    """Impossible values, checked before any work starts."""
    t, d = cfg.train, cfg.data
    _check(bool(cfg.model.name_or_path), origin, "model.name_or_path: required (a Hub id or a local model directory)")
    _check(d.seq_length >= 1, origin, f"data.seq_length: must be >= 1, got {d.seq_length}")
    _check(t.micro_batch_size >= 1, origin, f"train.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    _check(t.global_batch_size >= 1, origin, f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    per_step = t.micro_batch_size * world_size
    _check(t.global_batch_size % per_step == 0, origin,
           f"train.global_batch_size ({t.global_batch_size}) is not divisible by micro_batch_size "
           f"({t.micro_batch_size}) x data-parallel size ({world_size}) = {per_step}")
    _check(t.max_steps is None or t.max_steps >= 1, origin, f"train.max_steps: must be >= 1, got {t.max_steps}")
    _check(t.stop_at_step is None or t.stop_at_step >= 1, origin,
           f"train.stop_at_step: must be >= 1 or null, got {t.stop_at_step}")
    _check(t.num_epochs > 0, origin, f"train.num_epochs: must be > 0, got {t.num_epochs}")
    _check(t.optimizer.lr > 0, origin, f"train.optimizer.lr: must be > 0, got {t.optimizer.lr}")
    _check(len(t.optimizer.betas) == 2 and all(0 <= b < 1 for b in t.optimizer.betas), origin,
           f"train.optimizer.betas: expected two numbers in [0, 1), got {t.optimizer.betas}")
    _check(t.grad_clip is None or t.grad_clip > 0, origin, f"train.grad_clip: must be > 0 or null, got {t.grad_clip}")
    _check(t.max_bad_steps >= 1, origin, f"train.max_bad_steps: must be >= 1, got {t.max_bad_steps}")
    _check(t.log_every_steps >= 1, origin, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    _check(t.val_every_steps is None or t.val_every_steps >= 1, origin,
           f"train.val_every_steps: must be >= 1 or null, got {t.val_every_steps}")
    _check(t.lr_scheduler.warmup_steps >= 0, origin, "train.lr_scheduler.warmup_steps: must be >= 0")
    _check(t.loss_chunk_tokens >= 0, origin, f"train.loss_chunk_tokens: must be >= 0, got {t.loss_chunk_tokens}")
    _check(t.release_memory_every_steps is None or t.release_memory_every_steps >= 1, origin,
           f"train.release_memory_every_steps: must be >= 1 or null, got {t.release_memory_every_steps}")
    _check(d.num_workers >= 0, origin, f"data.num_workers: must be >= 0, got {d.num_workers}")
    _check(cfg.checkpoint.every_steps is None or cfg.checkpoint.every_steps >= 1, origin,
           "checkpoint.every_steps: must be >= 1 or null")
    _check(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1, origin,
           "checkpoint.keep_last: must be >= 1 or null")
    from tuneforge.data.sources import is_hub_id
    from tuneforge.peft.validate import validate_peft_section

    validate_peft_section(cfg, origin)
    for name, src in _data_sources(d):
        _check(src.limit is None or src.limit >= 1, origin, f"{name}.limit: must be >= 1 or null, got {src.limit}")
        _check(src.weight > 0, origin, f"{name}.weight: must be > 0, got {src.weight}")
        _check(bool(src.path), origin, f"{name}.path: required")
        _check(not check_paths or _exists(src.path) or is_hub_id(src.path), origin,
               f"{name}.path: no such file '{src.path}'")
    _check(isinstance(d.train, DataSource) or len(d.train) >= 1, origin, "data.train: needs at least one source")
    _check(d.val_split is None or 0 < d.val_split < 1 or (d.val_split >= 1 and float(d.val_split).is_integer()),
           origin, f"data.val_split: expected a fraction in (0, 1) or a whole number of examples, got {d.val_split}")
    _check(d.val_split is None or not d.validation, origin,
           "data.val_split: carves validation data from train only when data.validation is not given")
    if d.prompt_style == "chat":
        plain = [name for name, src in _data_sources(d) if src.format in ("text", "classification")]
        _check(not plain, origin, f"data.prompt_style: chat renders prompt/answer pairs as chat turns; "
               f"{plain[0] if plain else ''} has format text or classification, which have no prompt")
    _check(d.system_prompt is None or d.prompt_style == "chat", origin,
           "data.system_prompt: needs data.prompt_style: chat")
    validate_eval(cfg, origin, check_paths)
    validate_model_extras(cfg, origin, check_paths)
    if not check_paths:
        return
    mp = cfg.model.name_or_path
    if mp.lower().endswith(".gguf") and not cfg.model.gguf_file:
        _check(_exists(mp, "is_file"), origin, f"model.name_or_path: no such GGUF file '{mp}'")
    elif _looks_local(mp):
        _check(_exists(mp, "is_dir"), origin, f"model.name_or_path: no such model directory '{mp}'")
    _check(cfg.checkpoint.resume in ("auto", "never") or _exists(cfg.checkpoint.resume, "is_dir"), origin,
           f"checkpoint.resume: expected auto, never or an existing checkpoint directory, got '{cfg.checkpoint.resume}'")


def _exists(path: str, kind: str = "exists") -> bool:
    """Path.is_file / is_dir / exists that answers False for names no filesystem accepts (too long, NUL bytes)."""
    try:
        return getattr(Path(path).expanduser(), kind)()
    except (OSError, ValueError):
        return False


def _data_sources(d: DataConfig) -> list[tuple[str, DataSource]]:
    """(config path, source) of every train and validation source, whether given as one mapping or a list."""
    out = []
    for key, value in (("data.train", d.train), ("data.validation", d.validation)):
        if isinstance(value, list):
            out.extend((f"{key}[{i}]", src) for i, src in enumerate(value))
        elif value is not None:
            out.append((key, value))
    return out


def validate_eval(cfg: Config, origin: str, check_paths: bool) -> None:
    sq = cfg.eval.squad
    if sq is None:
        return
    for key in ("every_steps", "limit"):
        value = getattr(sq, key)
        _check(value is None or value >= 1, origin, f"eval.squad.{key}: must be >= 1 or null, got {value}")
    for key in ("max_new_tokens", "batch_size"):
        value = getattr(sq, key)
        _check(value >= 1, origin, f"eval.squad.{key}: must be >= 1, got {value}")
    if sq.path is not None:
        _check(not check_paths or Path(sq.path).is_file(), origin, f"eval.squad.path: no such file '{sq.path}'")
        return
    from tuneforge.eval.sources import validation_sources

    _check(any(src.format == "squad" for _, src in validation_sources(cfg.data)), origin,
           "eval.squad: needs eval.squad.path (a SQuAD json) or a squad-format data.validation set")


def validate_model_extras(cfg: Config, origin: str, check_paths: bool) -> None:
    """model.head, model.init_from and data.labels (classification and initialisation from a run)."""
    head, d = cfg.model.head, cfg.data
    if head is not None:
        _check(bool(head.hidden_layers) and all(w >= 1 for w in head.hidden_layers), origin,
               f"model.head.hidden_layers: expected a list of widths >= 1, got {head.hidden_layers}")
        _check(0 <= head.dropout < 1, origin, f"model.head.dropout: must be in [0, 1), got {head.dropout}")
    if d.labels is not None:
        _check(len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels), origin,
               f"data.labels: expected at least 2 distinct label names, got {d.labels}")
    init = cfg.model.init_from
    if init is not None:
        _check(cfg.model.weights_only, origin, "model.weights_only: false is not supported; init_from "
               "loads weights only (checkpoint.resume continues a run's optimizer, schedule and step)")
        _check(not check_paths or _exists(init, "is_dir"), origin,
               f"model.init_from: expected a run, checkpoint or final/ directory, got '{init}'")


def _looks_local(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (or an existing path) is a local directory."""
    return _exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, with secret-looking values redacted (safe to save and log)."""
    return _redact(dataclasses.asdict(cfg))


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        # Secrets are strings: a number under a secret-looking key (peft.num_virtual_tokens) is kept.
        return {k: ("<redacted>" if _SECRET.search(str(k)) and isinstance(v, str) and v != "" else _redact(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    # atomic: a resume compares against this file, and a half-written one would refuse the run
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe_schema(cls: type = Config, prefix: str = "") -> list[str]:
    """`key: help (default)` lines for every field, for --help-config."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe_schema(sub, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')} (default: {default!r})")
    return lines
