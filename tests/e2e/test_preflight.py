"""Pre-flight failures: one line, exit 2, before any training work."""
import pytest

from tests.conftest import run_cli, tiny_overrides


def finetune(recipe, tmp_path, *extra):
    return run_cli("finetune", "-c", str(recipe), *tiny_overrides(tmp_path, "pf", *extra), check=False)


def one_line_error(proc, text):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tuneforge: error: "), proc.stderr
    assert text in lines[0], lines[0]


def test_model_without_a_causal_lm_head(tiny_recipe, tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path / "t5")
    # model.kind auto would take it as the seq2seq model it is: a causal LM is asked for here
    proc = finetune(tiny_recipe, tmp_path, f"model.name_or_path={tmp_path / 't5'}", "model.kind=causal_lm")
    one_line_error(proc, "is a 't5' model without a causal-LM head")


def test_directory_without_a_model(tiny_recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(finetune(tiny_recipe, tmp_path, f"model.name_or_path={tmp_path / 'empty'}"),
                   "has no usable config.json")


def test_output_dir_that_cannot_be_written(tiny_recipe, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "pf"),
                   f"run.output_dir={tmp_path / 'afile' / 'runs'}", check=False)
    one_line_error(proc, "run.output_dir: cannot write to")


def test_seq_length_beyond_the_models_positions_is_warned(tiny_recipe, tmp_path):
    proc = finetune(tiny_recipe, tmp_path, "data.seq_length=1024", "train.max_steps=1", "data.train.limit=8")
    assert proc.returncode == 0 and "exceeds the model's 512 positions" in proc.stderr


def test_no_room_for_a_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from tuneforge.config import load_config
    from tuneforge.errors import UserError
    from tuneforge.train import finetune as run

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    cfg = load_config(tiny_recipe, tiny_overrides(tmp_path, "disk", "checkpoint.every_steps=1"))
    with pytest.raises(UserError, match=r"checkpoint.every_steps: .* GiB free; a checkpoint of"):
        run(cfg)
