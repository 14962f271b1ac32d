"""The architecture sweep as tests (`make test-models`): one per type in the installed transformers' causal-LM mapping.
A type that plain transformers + peft cannot train is skipped with transformers' own error, so an upgrade that fixes
it shows up as a test that runs; every other type must train with LoRA and full weights with transformers' own losses,
and pack exactly or be refused packing, and online RL must sample from it and score its samples as it trains. Each
test leaves its row for the table (tests/models/sweep.py --table)."""
import dataclasses
import json
import os
from pathlib import Path

import pytest

from tests.models.sweep import sweep_one
from tests.models.tiny import CAUSAL_LM_TYPES

pytestmark = pytest.mark.models


@pytest.mark.parametrize("model_type", CAUSAL_LM_TYPES)
def test_architecture(model_type, tmp_path):
    row = sweep_one(model_type, tmp_path)
    rows = os.environ.get("TUNEFORGE_SWEEP_ROWS")
    if rows:
        (Path(rows) / f"{model_type}.json").write_text(json.dumps(dataclasses.asdict(row)))
    if row.plain != "ok":
        pytest.skip(f"plain transformers + peft cannot train {model_type}: {row.plain}")
    assert row.lora == "ok", "\n".join([row.lora, *row.notes])
    assert row.full == "ok", "\n".join([row.full, *row.notes])
    assert row.packing.startswith(("exact", "refused: "))
    assert row.head == "split" or row.head.startswith("full forward: ")
    assert row.rl.startswith(("ok", "approximate: the model's forward", "refused: ")), \
        "\n".join([row.rl, *row.notes])
