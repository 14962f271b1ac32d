"""A GGUF file as the model source: converted once to a cached transformers directory that is the run's base.

The file is written fresh for each session from stories260K (F32 tensors), so no cache has seen it, and reading it
back is exact: the cached base must give stories260K's own logits."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import STORIES, read_metrics, run_cli, tiny_overrides
from tests.gguf_files import write_stories_gguf
from tuneforge import cli

PROMPT = "Context: Lily has a red ball. Question: What color is the ball? Answer:"


def logits(model, text=PROMPT):
    enc = AutoTokenizer.from_pretrained(STORIES)(text, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("gguf")
    source = write_stories_gguf(root / "tiny-stories.F32.gguf")
    proc = run_cli("finetune", "-c", str(tiny_recipe),
                   *tiny_overrides(root, "g", f"model.name_or_path={source}", "train.max_steps=3"))
    return root, source, proc


def test_a_new_gguf_file_trains_and_its_adapter_loads_in_plain_peft(gguf_run):
    from peft import PeftModel

    from tuneforge.run.model import load_run_model

    root, source, proc = gguf_run
    assert "dequantizing tiny-stories.F32.gguf" in proc.stderr
    assert [r["step"] for r in read_metrics(root / "g") if "loss" in r] == [1, 2, 3]
    base = json.loads((root / "g/final/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base.startswith(os.environ["TUNEFORGE_GGUF_CACHE"]) and "tiny-stories.F32-" in base
    recorded = (root / "g/config.yaml").read_text()
    assert f"name_or_path: {base}" in recorded and "gguf_file: null" in recorded
    config = json.loads((Path(base) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    # the cached base is the model the file holds, exactly
    cached = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert torch.equal(logits(cached), logits(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)))
    # plain peft on the cached base gives the logits tuneforge's own loader gives
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      root / "g/final")
    ours, _, _ = load_run_model(root / "g")
    assert torch.allclose(logits(plain), logits(ours), atol=1e-6)
    assert not torch.allclose(logits(plain), logits(cached), atol=1e-4)  # the adapter did train


def test_the_same_file_in_a_directory_reuses_the_cache(gguf_run, tiny_recipe):
    root, source, _ = gguf_run
    proc = run_cli("finetune", "-c", str(tiny_recipe),
                   *tiny_overrides(root, "again", f"model.name_or_path={root}", f"model.gguf_file={source.name}",
                                   "train.max_steps=1"))
    assert "dequantizing" not in proc.stderr
    first = json.loads((root / "g/final/adapter_config.json").read_text())["base_model_name_or_path"]
    again = json.loads((root / "again/final/adapter_config.json").read_text())["base_model_name_or_path"]
    assert again == first


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("tuneforge: error: "), err
    return err[0]


@pytest.mark.parametrize("damage, expect", [
    (lambda data: data[: len(data) // 2], "is not a readable GGUF file (truncated or corrupt"),
    (lambda data: b"GGUF" + b"\xff" * 64, "is not a readable GGUF file (truncated or corrupt"),
], ids=["truncated", "corrupt"])
def test_damaged_file_is_one_line_and_writes_nothing(gguf_run, tiny_recipe, tmp_path, capsys, damage, expect):
    _, source, _ = gguf_run
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(source.read_bytes()))
    before = sorted(os.listdir(os.environ["TUNEFORGE_GGUF_CACHE"]))
    line = error_line(["finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "bad",
                                                                         f"model.name_or_path={bad}")], capsys)
    assert f"model.name_or_path: '{bad}'" in line and expect in line, line
    assert sorted(os.listdir(os.environ["TUNEFORGE_GGUF_CACHE"])) == before
    assert not (tmp_path / "bad").exists()


def test_architecture_transformers_cannot_read_is_one_line(tiny_recipe, tmp_path, capsys):
    odd = write_stories_gguf(tmp_path / "odd.gguf", arch="rwkv9")
    line = error_line(["finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "odd",
                                                                         f"model.name_or_path={odd}")], capsys)
    assert "holds a 'rwkv9' model, which transformers cannot read from GGUF (it reads " in line and "llama" in line


def test_hub_repo_file_offline_is_one_line(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(["finetune", "-c", str(tiny_recipe),
                       *tiny_overrides(tmp_path, "hub", "model.name_or_path=someone/tiny-gguf",
                                       "model.gguf_file=tiny.Q8_0.gguf")], capsys)
    assert "model.name_or_path: 'someone/tiny-gguf': the Hub file 'tiny.Q8_0.gguf' is not in the local cache" in line


def test_without_the_gguf_package_is_one_line(gguf_run, tiny_recipe, tmp_path, capsys, monkeypatch):
    _, source, _ = gguf_run
    copy = tmp_path / "fresh.gguf"
    copy.write_bytes(source.read_bytes() + b"\0" * 32)  # another hash: not in the cache yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    line = error_line(["finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "nogguf",
                                                                         f"model.name_or_path={copy}")], capsys)
    assert "is a GGUF file, and reading it needs the gguf package: pip install gguf" in line
