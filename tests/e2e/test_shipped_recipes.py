"""Every shipped recipe loads, validates (also at the process count it is written for) and trains for 2 steps, in
this process, with its model swapped for a tiny one of the same architecture family and its data for shipped
samples. Everything else (PEFT method, batching, packing, quantization, freezing, schedules) is the recipe's own."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics
from tests.tiny_recipes import one_torch_thread, skip_report_plots, tiny_run_overrides  # noqa: F401 (autouse)
from tuneforge import finetune, load_config

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Recipes written for several GPUs: their batch arithmetic and strategy must hold at that size.
WORLD_SIZES = {"llama3_2_1b_squad_peft.yaml": 8, "llama3_2_1b_squad_sft.yaml": 8, "llama_7b_alpaca_fsdp.yaml": 4}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_trains_two_steps(recipe: Path, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name shipped files relative to the repository root
    skip_report_plots(monkeypatch)
    world_size = WORLD_SIZES.get(recipe.name, 1)
    load_config(recipe, world_size=world_size)  # every recipe rule at that size: batch arithmetic, the strategy
    run_dir = finetune(recipe, tiny_run_overrides(recipe, tiny_models, tmp_path))
    losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (run_dir / "final").is_dir()


def test_every_source_workflow_has_its_recipe():
    names = {p.name for p in RECIPES}
    assert {"llama3_2_1b_squad_peft.yaml", "llama_7b_alpaca_lora.yaml", "llama_7b_alpaca_qlora.yaml",
            "llama_7b_alpaca_fsdp.yaml", "llama_7b_alpaca_top2_layers.yaml", "llama3_8b_dolly_lora_packed.yaml",
            "llama3_2_1b_squad_sft.yaml", "gpt_squad_peft_schemes.yaml"} <= names


def peft_schemes() -> dict[str, str]:
    """peft_scheme -> the `peft=` value, from the table of docs/from-gpt-peft-tutorial.md."""
    text = (REPO / "docs/from-gpt-peft-tutorial.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `([\w,]+)` \| `([\[{].*[\]}])`", text, flags=re.M))


def test_the_docs_list_every_peft_scheme():
    assert set(peft_schemes()) == {"lora", "adapter", "ptuning", "ia3", "ptuning,lora"}


@pytest.mark.parametrize("scheme", ["adapter", "ptuning", "ptuning,lora"])  # lora: the recipe; ia3: the docs test
def test_each_peft_scheme_of_the_gpt_recipe_trains(scheme, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    skip_report_plots(monkeypatch)
    recipe = REPO / "recipes/gpt_squad_peft_schemes.yaml"
    run_dir = finetune(recipe, [f"peft={peft_schemes()[scheme]}", *tiny_run_overrides(recipe, tiny_models, tmp_path)])
    assert len([row for row in read_metrics(run_dir) if "loss" in row]) == 2
