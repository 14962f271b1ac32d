"""Reward functions of online RL: the built-ins of config/rewards.py and the user's own, by import path, called with
TRL's signature, so a TRL user's reward functions work unchanged:

    fn(prompts=[...], completions=[...], completion_ids=[[...]], <column>=[...] for each of the record's other
       columns, trainer_state=None) -> one float (or None: not scored by this function) per completion

A reward that raises, returns the wrong count or a non-number, or names a column the data does not have is refused in
one line naming the function (exit 2)."""
from __future__ import annotations

import importlib
import inspect
import math

import torch
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuneforge.config.rewards import BY_NAME, is_import_path
from tuneforge.config.rules.rl import reward_name
from tuneforge.config.schema import RewardSpec
from tuneforge.errors import UserError, first_line
from tuneforge.eval.squad import best_over_golds, exact_match, f1, normalize_answer

RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")  # the call's own keyword arguments


def first_line_of(text: str) -> str:
    """A short answer: the completion's first line after leading whitespace (as eval.squad reads an answer)."""
    return text.lstrip().split("\n")[0].strip()


def _answers(kwargs: dict, n: int) -> list[list[str]]:
    answers = kwargs.get("answers")
    if answers is None:
        raise KeyError("answers")
    out = []
    for a in answers:
        if isinstance(a, dict):  # the Hub layout: {"text": [...], "answer_start": [...]}
            a = a.get("text") or []
        out.append([a] if isinstance(a, str) else list(a))
    return out


# A built-in reads its own fields (column, pattern, target) from `options`, so no data column can shadow them.

def squad_f1_reward(prompts, completions, **kwargs) -> list[float]:
    golds = _answers(kwargs, len(completions))
    return [best_over_golds(f1, first_line_of(c), g) if g else 0.0 for c, g in zip(completions, golds)]


def squad_em_reward(prompts, completions, **kwargs) -> list[float]:
    golds = _answers(kwargs, len(completions))
    return [best_over_golds(exact_match, first_line_of(c), g) if g else 0.0 for c, g in zip(completions, golds)]


def exact_match_reward(prompts, completions, options: dict, **kwargs) -> list[float]:
    values = kwargs[options["column"]]
    return [float(normalize_answer(c) == normalize_answer(str(v))) for c, v in zip(completions, values)]


def regex_reward(prompts, completions, options: dict, **kwargs) -> list[float]:
    rx = re.compile(options["pattern"], re.DOTALL)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length_reward(prompts, completions, options: dict, **kwargs) -> list[float]:
    target = options["target"]
    return [max(0.0, 1.0 - abs(len(c) - target) / target) for c in completions]


@dataclass
class RewardFunction:
    name: str            # rewards/<name>/mean
    weight: float
    fn: Callable
    options: dict        # a built-in's own fields (column, pattern, target)
    label: str           # how an error names it: "rl.rewards[0] (squad_f1)"
    builtin: bool = False

    def __call__(self, prompts: list, completions: list, completion_ids: list, columns: dict) -> list[float | None]:
        own = {"options": self.options} if self.builtin else {}
        # a column named like one of the call's own arguments cannot be passed (as in TRL)
        columns = {k: v for k, v in columns.items() if k not in RESERVED and k not in own}
        try:
            values = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                             trainer_state=None, **columns, **own)
        except KeyError as e:
            if not e.args or not isinstance(e.args[0], str) or e.args[0] in columns:
                raise UserError(f"{self.label}: raised KeyError: {first_line(e)}") from e
            have = ", ".join(sorted(columns)) or "none"
            raise UserError(f"{self.label}: reads column {e.args[0]!r}, which the data does not have (columns: "
                            f"{have})") from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's function: any failure is bad input, said in one line
            raise UserError(f"{self.label}: raised {type(e).__name__}: {first_line(e)}") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"{self.label}: returned {got} for {len(completions)} completions; expected one float "
                            "(or None) per completion")
        out = []
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "item")):
                raise UserError(f"{self.label}: value {i} is {type(v).__name__} ({str(v)[:40]!r}); expected a float "
                                "or None")
            v = None if v is None else float(v)
            if v is not None and not math.isfinite(v):
                raise UserError(f"{self.label}: value {i} is {v}; expected a finite float or None")
            out.append(v)
        return out


def load_reward(spec: RewardSpec, where: str) -> RewardFunction:
    label = f"{where} ({spec.function})"
    if not is_import_path(spec.function):
        entry = BY_NAME[spec.function]
        options = {k: getattr(spec, k) for k in entry.needs}
        return RewardFunction(reward_name(spec), spec.weight, globals()[entry.function], options, label, builtin=True)
    module_name, _, attr = spec.function.partition(":")
    if str(Path.cwd()) not in sys.path:  # a reward module beside the recipe, as `python -m` would find it
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a user's module: any failure to import it is bad input
        raise UserError(f"{label}: cannot import module {module_name!r} ({type(e).__name__}: {first_line(e)})") \
            from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{label}: module {module_name!r} has no function {attr!r}")
    try:
        inspect.signature(fn)
    except (TypeError, ValueError):
        pass
    return RewardFunction(reward_name(spec), spec.weight, fn, {}, label)


def load_rewards(specs: list[RewardSpec]) -> list[RewardFunction]:
    return [load_reward(spec, f"rl.rewards[{i}]") for i, spec in enumerate(specs)]


def score(rewards: list[RewardFunction], prompts: list, completions: list, completion_ids: list,
          columns: list[dict]) -> list[list[float | None]]:
    """Each reward function's values, (functions, completions); columns are one dict per completion."""
    names = set().union(*(c.keys() for c in columns)) if columns else set()
    by_column = {k: [c.get(k) for c in columns] for k in names}
    return [r(prompts, completions, completion_ids, by_column) for r in rewards]


def check_rewards(rewards: list[RewardFunction], prompt) -> None:
    """Call every reward once, before anything is written: on `prompt` (the first training prompt) with an empty
    completion and a short one, so a function that raises, miscounts, returns a non-number or reads a column the data
    does not have is refused up front (a reward must score any text)."""
    completions = ["", "0"]
    score(rewards, [prompt.shown] * 2, completions, [[], []], [prompt.columns] * 2)


def reward_table(rewards: list[RewardFunction], values: list[list[float | None]]) -> torch.Tensor:
    """score()'s values as a (completions, functions) tensor, NaN where a function gave None."""
    n = len(values[0]) if values else 0
    return torch.tensor([[math.nan if v is None else v for v in fn] for fn in values],
                        dtype=torch.float32).t().reshape(n, len(rewards))


def held_out_rewards(rewards: list[RewardFunction], per_set: dict[str, torch.Tensor]) -> dict[str, float]:
    """val_reward (the weighted sum, completions no function scored left out) and val_rewards/<name>/mean of each
    set's (completions, functions) rewards, suffixed /<set> where there are several, whose mean val_reward is then."""
    weights = torch.tensor([r.weight for r in rewards])
    out, many = {}, len(per_set) > 1
    for set_name, every in per_set.items():
        summed = (every * weights).nansum(1).masked_fill(every.isnan().all(1), math.nan)
        suffix = f"/{set_name}" if many else ""
        out[f"val_reward{suffix}"] = float(summed.nanmean()) if summed.numel() else math.nan
        for i, r in enumerate(rewards):
            out[f"val_rewards/{r.name}/mean{suffix}"] = float(every[:, i].nanmean())
    if many:
        out["val_reward"] = sum(v for k, v in out.items() if k.startswith("val_reward/")) / len(per_set)
    return out
