"""Load a YAML recipe into the typed schema: dotted overrides, strict types, "did you mean", one-line errors."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from tuneforge.config.rules import check_recipe
from tuneforge.config.schema import Config
from tuneforge.errors import UserError
from tuneforge.files import read_user_text
from tuneforge.files import write_atomic

_SECRET = re.compile(r"token(?!s|izer)|key|secret|password", re.IGNORECASE)  # max_new_tokens is a count


def load_config(source: str | os.PathLike | dict | Config | None = None, overrides: list[str] | None = None,
                world_size: int = 1, check_paths: bool = True) -> Config:
    """Build a Config from a YAML path, a dict or a Config, then apply `key.sub=value` overrides; every recipe rule
    (config/rules) is checked for a run of `world_size` processes."""
    if isinstance(source, Config):
        raw, origin, text = dataclasses.asdict(source), "<config>", None
    elif isinstance(source, dict):
        raw, origin, text = copy.deepcopy(source), "<dict>", None
    elif source is None:
        raw, origin, text = {}, "<defaults>", None
    else:
        origin = str(source)
        text = read_user_text(source, origin, "recipe file", detail=True)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{origin}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{origin}: a recipe must be a mapping of sections (run, model, data, ...), "
                            f"got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = _build(Config, raw, "")
    except _FieldError as e:
        line = _line_of(text, e.path) if text else None
        where = f"{origin}:{line}" if line else origin
        raise UserError(f"{where}: {e.path}: {e.message}") from None
    check_recipe(cfg, origin, world_size, check_paths)
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
        if isinstance(child, Override) and isinstance(child.parsed, (dict, list)):
            child = node[part] = child.parsed  # a section given whole by an earlier override: set a key inside it
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
