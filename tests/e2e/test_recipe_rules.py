"""One set of recipe rules for every subcommand that takes a recipe: `slurm`, `plan` and `prepare-data` refuse what
`finetune` refuses, with the same one line; `finetune --nproc-per-node 2` refuses in the launcher's own process,
once, before torchrun starts (no line per rank, no torchrun traceback)."""
import json

import pytest

from tests.conftest import run_cli, tiny_overrides
from tuneforge import cli

T5_CONFIG = {"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32, "vocab_size": 64}
CLASSIFICATION_ROWS = ['{"text": "a big dog", "label": "animal"}', '{"text": "a red apple", "label": "food"}']
ADAPTER_LIST = ["distributed.strategy=fsdp2", "peft=[{method: lora}, {method: prompt_tuning}]"]
FSDP2_LIST = "distributed.strategy: fsdp2 trains one peft method at a time; use ddp for adapter lists"

# (what, overrides, part of the message) of recipes refused by a rule of the recipe alone, for 2 processes.
# The tiny recipe trains micro 8 x global 8: global 16 keeps the batch arithmetic of 2 processes whole.
REFUSED_FOR_TWO = [
    ("fsdp2 with a list of adapters", [*ADAPTER_LIST, "train.global_batch_size=16"], FSDP2_LIST),
    ("QLoRA under ddp", ["model.quantization={bits: 4}", "distributed.strategy=ddp", "train.global_batch_size=16"],
     "model.quantization: QLoRA runs in one process; use distributed.strategy=single"),
    ("batch arithmetic", ["train.global_batch_size=8"],
     "train.global_batch_size (8) is not divisible by micro_batch_size (8) x data-parallel size (2) = 16"),
    ("strategy single on two processes", ["distributed.strategy=single", "train.global_batch_size=16"],
     "distributed.strategy: single cannot run on 2 processes; use ddp or fsdp2"),
    ("HSDP replicas that do not divide the processes",
     ["distributed.strategy=fsdp2", "distributed.dp_replicate=3", "train.global_batch_size=16"],
     "distributed.dp_replicate (3) must divide the world size (2)"),
    ("packing with a seq2seq model", ["model.name_or_path={t5}", "model.kind=seq2seq", "data.batching=packing",
                                      "train.global_batch_size=16"],
     "data.batching: packing applies to causal LMs; a seq2seq model pads"),
]


@pytest.fixture
def scratch(tmp_path):
    """A tiny T5 config (model.kind seq2seq) and a classification file beside the run directories."""
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5/config.json").write_text(json.dumps(T5_CONFIG))
    (tmp_path / "cls.jsonl").write_text("\n".join(CLASSIFICATION_ROWS) + "\n")
    return tmp_path


def overrides(tmp_path, extra: list[str]) -> list[str]:
    return tiny_overrides(tmp_path, "rules", *(o.replace("{t5}", str(tmp_path / "t5")) for o in extra))


def refusal(capsys, *argv: str) -> str:
    """The one line a refused command prints (exit 2), run in this process."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tuneforge: error: "), err
    return err[0]


def subprocess_refusal(*argv: str) -> str:
    """The one line a refused `tuneforge` command prints (exit 2), as a real process: no traceback of any kind."""
    proc = run_cli(*argv, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("tuneforge: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("what, extra, expect", REFUSED_FOR_TWO, ids=[case[0] for case in REFUSED_FOR_TWO])
def test_slurm_refuses_what_the_launcher_refuses(what, extra, expect, tiny_recipe, scratch, capsys):
    script = scratch / "job.sbatch"
    slurm = refusal(capsys, "slurm", "-c", str(tiny_recipe), "--nodes", "1", "--gpus-per-node", "2",
                    "--out", str(script), *overrides(scratch, extra))
    launcher = refusal(capsys, "finetune", "-c", str(tiny_recipe), "--nproc-per-node", "2",
                       *overrides(scratch, extra))
    assert expect in slurm
    assert slurm == launcher
    assert not script.exists()


@pytest.mark.parametrize("extra, expect", [
    (ADAPTER_LIST, FSDP2_LIST),
    (["model.name_or_path={t5}", "model.kind=seq2seq", "data.batching=packing"], "data.batching: packing applies"),
    (["train.global_batch_size=12"], "train.global_batch_size (12) is not divisible by micro_batch_size (8)"),
], ids=["fsdp2 with a list of adapters", "packing with a seq2seq model", "batch arithmetic"])
def test_every_subcommand_that_takes_a_recipe_refuses_it_alike(extra, expect, tiny_recipe, scratch, capsys):
    recipe = ["-c", str(tiny_recipe), *overrides(scratch, extra)]
    messages = {
        "finetune": refusal(capsys, "finetune", *recipe),
        "slurm": refusal(capsys, "slurm", *recipe, "--nodes", "1", "--gpus-per-node", "1",
                         "--out", str(scratch / "job.sbatch")),
        "plan": refusal(capsys, "plan", *recipe),
        "prepare-data": refusal(capsys, "prepare-data", *recipe),
    }
    assert expect in messages["finetune"]
    assert set(messages.values()) == {messages["finetune"]}, messages


def test_launcher_refuses_a_recipe_rule_once_before_torchrun(tiny_recipe, scratch):
    """The refusal of two processes is the one-process refusal, printed once by the launcher's own process."""
    args = ["finetune", "-c", str(tiny_recipe), *overrides(scratch, [*ADAPTER_LIST, "train.global_batch_size=16"])]
    one = subprocess_refusal(*args)
    two = subprocess_refusal(*args, "--nproc-per-node", "2")
    assert FSDP2_LIST in two and two == one


def test_launcher_runs_the_preflight_once_before_torchrun(tiny_recipe, scratch):
    """A rule that needs the model's config.json (classification data, but the model resolves to a causal LM)."""
    args = ["finetune", "-c", str(tiny_recipe), *overrides(scratch, [
        f"data.train.path={scratch / 'cls.jsonl'}", "data.train.format=classification", "peft=null",
        "train.global_batch_size=16"])]
    one = subprocess_refusal(*args)
    two = subprocess_refusal(*args, "--nproc-per-node", "2")
    assert "data format classification needs model.kind: sequence_classification" in two and two == one
    assert not (scratch / "rules").exists()  # no run directory either
