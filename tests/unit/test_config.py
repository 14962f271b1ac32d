import pytest
import yaml

from tuneforge.config import describe_schema, dump_config, load_config
from tuneforge.errors import UserError
from tests.conftest import SQUAD_TRAIN, STORIES

BASE = {"model": {"name_or_path": str(STORIES)}, "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}}}


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides():
    cfg = load_config(BASE, ["train.micro_batch_size=4", "train.global_batch_size=16", "train.optimizer.lr=1e-5",
                             "peft.lora_rank=32", "train.optimizer.betas=[0.9, 0.95]", "run.name=007"])
    assert cfg.train.micro_batch_size == 4 and cfg.train.global_batch_size == 16
    assert cfg.train.optimizer.lr == 1e-5  # YAML 1.1 reads "1e-5" as a string; the schema makes it a float
    assert cfg.peft.lora_rank == 32 and cfg.peft.method == "lora"
    assert cfg.train.optimizer.betas == [0.9, 0.95]
    assert cfg.run.name == "007"
    assert load_config(BASE, ["peft=null"]).peft is None


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, f"model:\n  name_or_path: {STORIES}\ndata:\n  seq_lenght: 128\n")
    with pytest.raises(UserError, match=r"r\.yaml:4: data\.seq_lenght: unknown key; did you mean data\.seq_length\?"):
        load_config(path)


def test_wrong_type_names_line_and_field(tmp_path):
    path = write(tmp_path, f"model: {{name_or_path: {STORIES}}}\ntrain:\n  micro_batch_size: eight\n")
    with pytest.raises(UserError, match=r"r\.yaml:3: train\.micro_batch_size: expected an integer, got 'eight'"):
        load_config(path)


def test_bad_choice_suggests():
    with pytest.raises(UserError, match=r"model\.dtype: expected one of auto\|float32\|bfloat16, got 'bf16'"):
        load_config(BASE, ["model.dtype=bf16"])


@pytest.mark.parametrize("override, message", [
    ("train.global_batch_size=12", r"global_batch_size \(12\) is not divisible by micro_batch_size \(8\)"),
    ("data.seq_length=0", r"data\.seq_length: must be >= 1, got 0"),
    ("train.optimizer.lr=0", r"lr: must be > 0"),
    ("data.train.path=/nonexistent/x.json", r"data\.train\.path: no such file '/nonexistent/x\.json'"),
    ("model.name_or_path=./no/such/model", r"model\.name_or_path: no such model directory"),
    ("checkpoint.resume=/nonexistent/ckpt", r"checkpoint\.resume: expected auto, never"),
])
def test_impossible_values(override, message):
    with pytest.raises(UserError, match=message):
        load_config(BASE, [override])


def test_world_size_enters_batch_arithmetic():
    load_config(BASE, ["train.global_batch_size=16"], world_size=2)
    with pytest.raises(UserError, match=r"x data-parallel size \(2\) = 16"):
        load_config(BASE, ["train.global_batch_size=8"], world_size=2)


def test_hub_id_is_not_checked_locally():
    assert load_config(BASE, ["model.name_or_path=meta-llama/Llama-3.2-1B"]).model.name_or_path.startswith("meta")


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"r\.yaml:\d+: invalid YAML"):
        load_config(write(tmp_path, "model:\n  name_or_path: [unclosed\n"))
    with pytest.raises(UserError, match="no such recipe file"):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trips_and_redacts(tmp_path):
    cfg = load_config(BASE, ["logging.wandb.project=p"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    from tuneforge.config.load import _redact
    assert _redact({"hub_token": "hf_abc", "api_key": "k", "nested": {"password": "p", "ok": 1}}) == \
        {"hub_token": "<redacted>", "api_key": "<redacted>", "nested": {"password": "<redacted>", "ok": 1}}
    assert saved["logging"]["wandb"]["project"] == "p"


def test_every_field_has_help():
    lines = describe_schema()
    assert any(line.startswith("train.optimizer.lr: peak learning rate") for line in lines)
    assert all(": " in line and not line.split(": ", 1)[1].startswith("(") for line in lines)


def test_cli_takes_overrides_before_and_after_options(tmp_path, monkeypatch):
    from tuneforge import cli

    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "finetune", lambda args: seen.setdefault("args", args) and 0)
    cli.main(["finetune", "-c", "r.yaml", "a.b=1", "--overwrite", "c.d=2"])
    assert seen["args"].overrides == ["a.b=1", "c.d=2"] and seen["args"].overwrite
    with pytest.raises(SystemExit):
        cli.main(["finetune", "-c", "r.yaml", "--no-such-flag"])
