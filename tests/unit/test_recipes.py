from pathlib import Path

import pytest

from tuneforge.config import load_config
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads_and_validates(recipe: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root
    cfg = load_config(recipe)
    assert cfg.model.name_or_path


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)
