"""The built-in reward functions of online RL (the recipe's rl.rewards): one `Reward` entry each, and every per-reward
list derives from them.

What a reward is lives here once: its name (a `function:` of rl.rewards), the RewardSpec fields it needs, its help
text and the name of its Python function in eval/rewards.py (found there by `function`). A reward given as an import
path (`my_rewards:score`) is the user's own, called with TRL's signature. Layer 3: plain Python only, no torch."""
from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config.registry import index_by_name


@dataclass(frozen=True)
class Reward:
    name: str       # rl.rewards[].function
    function: str   # its function in eval/rewards.py: (prompts, completions, **columns) -> list of floats
    help: str
    needs: tuple[str, ...] = ()  # RewardSpec fields it reads, which must be set


REWARDS: tuple[Reward, ...] = (
    Reward("squad_f1", "squad_f1_reward", "SQuAD F1 (0..1) of the completion's first line against the record's gold "
           "answers, by tuneforge's SQuAD metric (squad-format data)"),
    Reward("squad_em", "squad_em_reward", "SQuAD exact match (0 or 1) of the completion's first line against the "
           "record's gold answers"),
    Reward("exact_match", "exact_match_reward", "1 where the completion, normalised as SQuAD does, equals the "
           "record's `column`, else 0", needs=("column",)),
    Reward("regex", "regex_reward", "1 where the whole completion (stripped) matches `pattern` (re.fullmatch, dot "
           "matches newlines), else 0: a format reward", needs=("pattern",)),
    Reward("length", "length_reward", "1 - |characters - target| / target, floored at 0: towards `target` "
           "characters", needs=("target",)),
)

BY_NAME = index_by_name(REWARDS, "reward")
REWARD_NAMES = tuple(BY_NAME)


def is_import_path(function: str) -> bool:
    """A user's reward: `module:attribute` (the module importable from the working directory or PYTHONPATH)."""
    return ":" in function
