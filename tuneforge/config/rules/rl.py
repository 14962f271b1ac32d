"""The rl section (online RL: GRPO and its loss family): its values, the data it samples from, its batch arithmetic,
and which reference a run with a KL term gets. `rl_reference_kind` is the one place that decides the reference, for
the recipe and for `tuneforge plan`."""
from __future__ import annotations

from tuneforge.config.rewards import BY_NAME, is_import_path
from tuneforge.config.rules.common import check, fail
from tuneforge.config.rules.preference import adapter_off_obstacle
from tuneforge.config.schema import Config, RewardSpec
from tuneforge.config.sources import recipe_sources

PROMPT_FORMATS = ("squad", "input_output", "alpaca", "dolly", "chat", "prompt")


def check_rl(cfg: Config, origin: str | None) -> None:
    rl, sources = cfg.rl, recipe_sources(cfg.data)
    if rl is None:
        bad = next((name for name, src in sources if src.format == "prompt"), None)
        check(bad is None, origin, f"{bad}.format: prompt data (prompts without answers) trains with an rl section "
                                   "(e.g. rl: {rewards: [{function: squad_f1}]})")
        return
    check(cfg.preference is None, origin, "rl: a recipe has one objective; remove the preference section or rl")
    bad = next(((name, src.format) for name, src in sources if src.format not in PROMPT_FORMATS), None)
    check(bad is None, origin, f"{bad[0] if bad else ''}.format: rl samples completions of prompts; expected one of "
                               f"{', '.join(PROMPT_FORMATS)}, got {bad[1] if bad else ''}")
    check(bool(rl.rewards), origin, "rl.rewards: at least one reward function, e.g. [{function: squad_f1}]")
    names = set()
    for i, spec in enumerate(rl.rewards):
        check_reward(spec, f"rl.rewards[{i}]", origin)
        name = reward_name(spec)
        check(name not in names, origin, f"rl.rewards[{i}].name: '{name}' is used twice; give each reward its own name")
        names.add(name)
    check(rl.num_generations >= 2, origin, f"rl.num_generations: must be >= 2 (advantages compare the completions of "
                                           f"one prompt), got {rl.num_generations}")
    check(rl.max_completion_length >= 1, origin,
          f"rl.max_completion_length: must be >= 1, got {rl.max_completion_length}")
    budget = cfg.data.seq_length - rl.max_completion_length
    check(budget >= 1, origin, f"rl.max_completion_length ({rl.max_completion_length}) leaves no room for a prompt in "
                               f"data.seq_length ({cfg.data.seq_length}); raise seq_length")
    check(rl.max_prompt_length is None or 1 <= rl.max_prompt_length <= budget, origin,
          f"rl.max_prompt_length: expected 1 .. data.seq_length - max_completion_length ({budget}) or null, got "
          f"{rl.max_prompt_length}")
    check(rl.temperature > 0, origin, f"rl.temperature: must be > 0 (sampling), got {rl.temperature}")
    check(0 < rl.top_p <= 1, origin, f"rl.top_p: expected a value in (0, 1], got {rl.top_p}")
    check(rl.top_k >= 0, origin, f"rl.top_k: must be >= 0 (0 = no top-k), got {rl.top_k}")
    check(rl.beta >= 0, origin, f"rl.beta: must be >= 0, got {rl.beta}")
    check(rl.epsilon >= 0 and (rl.epsilon_high is None or rl.epsilon_high >= 0), origin,
          "rl.epsilon / rl.epsilon_high: must be >= 0")
    check(rl.num_iterations >= 1, origin, f"rl.num_iterations: must be >= 1, got {rl.num_iterations}")
    check(rl.generation_batch_size is None or rl.generation_batch_size >= 1, origin,
          f"rl.generation_batch_size: must be >= 1 or null, got {rl.generation_batch_size}")
    check(rl.log_completions >= 0, origin, f"rl.log_completions: must be >= 0, got {rl.log_completions}")
    check(cfg.data.batching != "packing", origin,
          "data.batching: rl batches its completions padded; use pad_longest (packing is for SFT and preference)")
    check(not cfg.data.train_on_inputs, origin, "data.train_on_inputs: rl learns from completions; the prompt is "
                                                "never a target")
    check(cfg.data.val_split is None, origin,
          "data.val_split: rl runs take held-out prompts from data.validation")
    t = cfg.train
    check(t.global_batch_size % rl.num_generations == 0, origin,
          f"train.global_batch_size ({t.global_batch_size}) counts completions: it must be a multiple of "
          f"rl.num_generations ({rl.num_generations})")
    if rl.reference == "adapter_off" and rl.beta > 0:
        rl_reference_kind(cfg, "single", origin)


def check_reward(spec: RewardSpec, where: str, origin: str | None) -> None:
    check(bool(spec.function), origin, f"{where}.function: a built-in reward ({', '.join(BY_NAME)}) or an import "
                                       "path (my_rewards:score)")
    if not is_import_path(spec.function):
        entry = BY_NAME.get(spec.function)
        check(entry is not None, origin, f"{where}.function: unknown reward '{spec.function}'; expected one of "
                                         f"{', '.join(BY_NAME)} or an import path (module:function)")
        for field in entry.needs:
            check(getattr(spec, field) is not None, origin, f"{where}.{field}: reward {spec.function} needs it")
    else:
        module, _, attr = spec.function.partition(":")
        check(bool(module) and bool(attr), origin,
              f"{where}.function: expected module:function, got '{spec.function}'")
    check(spec.target is None or spec.target >= 1, origin, f"{where}.target: must be >= 1, got {spec.target}")
    check(spec.weight == spec.weight, origin, f"{where}.weight: must be a number")


def reward_name(spec: RewardSpec) -> str:
    """The reward's name in metrics: its own name, else the function's (the attribute of an import path)."""
    return spec.name or spec.function.rpartition(":")[2]


def rl_reference_kind(cfg: Config, strategy: str, origin: str | None = None) -> str:
    """none (beta 0: no KL term), adapter_off (the adapter switched off: the base model, no copy) or copy (a frozen
    copy of the starting model, which `tuneforge plan` counts)."""
    rl = cfg.rl
    if rl is None or rl.beta == 0:
        return "none"
    why = adapter_off_obstacle(cfg)
    if rl.reference == "adapter_off" and why:
        fail(origin, f"rl.reference: adapter_off {why}; use copy (auto picks it)")
    return "copy" if rl.reference == "copy" or why else "adapter_off"
