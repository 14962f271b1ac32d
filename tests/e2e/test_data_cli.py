"""The data path through the real command line: prepare-data, weighted sources with named validation sets and
packing in finetune (with an exact resume), and one-line errors for bad data."""
import json
from pathlib import Path

import pytest

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN, STORIES, read_metrics, run_cli, tiny_overrides

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_prepare_data_reports_and_writes_the_formatted_records(tiny_recipe, tmp_path):
    out = tmp_path / "formatted.jsonl"
    args = ["prepare-data", "-c", str(tiny_recipe), f"model.name_or_path={STORIES}", "data.train.limit=30",
            "data.seq_length=200", "--out", str(out)]
    first = run_cli(*args).stdout
    assert "train: 30 examples" in first and "tokenized in" in first
    assert "truncated" in first and "dropped: none" in first
    assert "padding waste" in first and "example 0 (trained-on tokens between >>> and <<<)" in first
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30
    squad = json.loads(SQUAD_TRAIN.read_text())
    para = squad["data"][0]["paragraphs"][0]
    assert rows[0] == {"input": f"Context: {para['context']} Question: {para['qas'][0]['question']} Answer:",
                       "output": " " + para["qas"][0]["answers"][0]["text"].strip()}
    # The example's labelled span is the answer and eos.
    shown = first.split("example 0 (trained-on tokens between >>> and <<<):\n")[1].split("\nwrote ")[0]
    assert shown.replace(">>> ", ">>>").rstrip().endswith(f">>>{rows[0]['output'].strip()}</s><<<")
    assert shown.count(">>>") == 1
    again = run_cli(*args[:-2]).stdout
    assert "from cache" in again and "tokenized in" not in again
    packed = run_cli(*args[:-2], "data.batching=packing").stdout
    assert "packing efficiency" in packed


def write_recipe(tmp_path: Path, batching: str) -> Path:
    recipe = tmp_path / f"mix_{batching}.yaml"
    recipe.write_text(f"""
model: {{name_or_path: {STORIES}, dtype: float32}}
peft: {{method: lora, lora_rank: 4, lora_alpha: 8}}
data:
  seq_length: 256
  batching: {batching}
  train:
    - {{path: {SQUAD_TRAIN}, format: squad, limit: 48, weight: 3}}
    - {{path: {FIX / 'alpaca_sample.json'}, format: alpaca, weight: 1}}
  validation:
    - {{path: {SQUAD_DEV}, format: squad, limit: 8, name: squad}}
    - {{path: {FIX / 'dolly_sample.jsonl'}, format: dolly, name: dolly}}
train: {{micro_batch_size: 2, global_batch_size: 4, max_steps: 4, val_every_steps: 2}}
checkpoint: {{every_steps: 2}}
logging: {{tensorboard: false, progress: false}}
""")
    return recipe


def test_packed_mixture_with_named_validation_sets_resumes_exactly(tmp_path):
    """(group_by_length and the other modes resume exactly at the loader level: tests/unit/test_data_loader.py)"""
    recipe = write_recipe(tmp_path, "packing")
    common = [f"run.output_dir={tmp_path}"]
    whole = run_cli("finetune", "-c", str(recipe), *common, "run.name=whole")
    assert "weight 3" in whole.stdout and "data: validation 'dolly'" in whole.stdout
    assert "packing efficiency" in whole.stdout
    run_cli("finetune", "-c", str(recipe), *common, "run.name=parts", "train.stop_at_step=2")
    run_cli("finetune", "-c", str(recipe), *common, "run.name=parts")
    rows = read_metrics(tmp_path / "whole")
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 4]
    for r in val_rows:
        parts = [r["val_loss/squad"], r["val_loss/dolly"]]
        assert min(parts) < r["val_loss"] < max(parts)  # token-weighted over both sets
    timing = {"tokens_per_s", "step_seconds", "peak_rss_mb"}
    got, want = read_metrics(tmp_path / "parts"), rows
    assert [{k: v for k, v in g.items() if k not in timing} for g in got] == \
        [{k: v for k, v in w.items() if k not in timing} for w in want]


@pytest.mark.parametrize("override, content, message", [
    ("data.train.format=alpaca", '[{"instruction": "x", "output": 1}]',
     r"^tuneforge: error: .*bad\.json: record 0: field 'output' must be str, got int\n$"),
    ("data.train.format=squadd", "{}", r"^tuneforge: error: .*data\.train\.format: expected one of .*did you mean squad\?\n$"),
])
def test_bad_data_is_one_line_and_exit_2(tiny_recipe, tmp_path, override, content, message):
    """Through the real CLI (the other bad-data messages are checked at the unit level)."""
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "bad", f"data.train.path={bad}",
                                                                       override), check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    import re
    assert re.search(message, proc.stderr), proc.stderr
