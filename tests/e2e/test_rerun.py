"""A rerun into an existing run directory: a finished run's files never change unless --overwrite says so.

Refused reruns (bad input, a recipe that trains differently) leave every file byte-identical; a rerun of a finished
run with the same recipe has nothing to do and changes nothing; a resume may change only what does not change a
training step (logging, eval cadence, a longer max_steps), and says so."""
import shutil
import sys

import pytest

from tests.conftest import SQUAD_TRAIN, read_metrics, run_cli, tiny_overrides
from tuneforge import cli


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_recipe):
    """A finished 2-step run (`keep`, checkpoint at step 2) trained on its own copy of the data."""
    out = tmp_path_factory.mktemp("rerun")
    shutil.copy(SQUAD_TRAIN, out / "train.json")
    args = ["finetune", "-c", str(tiny_recipe),
            *tiny_overrides(out, "keep", f"data.train.path={out / 'train.json'}", "train.max_steps=2",
                            "checkpoint.every_steps=2")]
    run_cli(*args)
    assert (out / "keep/final").is_dir() and (out / "keep/checkpoints/step_2").is_dir()
    return out, args


def rerun_in_process(args, capsys, *extra):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli.main([*args, *extra]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize("extra, expect", [
    (["data.train.path=malformed.jsonl", "data.train.format=input_output"],
     "data.train.path: recorded '{out}/train.json', now 'malformed.jsonl'"),
    (["train.optimizer.lr=0.001"], "train.optimizer.lr: recorded 0.003, now 0.001"),
    (["peft.lora_rank=8", "run.seed=7"], "peft.lora_rank: recorded 4, now 8; run.seed: recorded 42, now 7"),
], ids=["other-data", "other-lr", "other-rank-and-seed"])
def test_rerun_with_another_recipe_is_refused_and_changes_nothing(finished, capsys, tmp_path, monkeypatch, extra,
                                                                 expect):
    out, args = finished
    (tmp_path / "malformed.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": \n')
    monkeypatch.chdir(tmp_path)
    before = snapshot(out / "keep")
    code, _, err = rerun_in_process(args, capsys, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("tuneforge: error: "), err
    assert expect.format(out=out) in err[0] and "new run.name" in err[0] and "--overwrite" in err[0], err[0]
    assert snapshot(out / "keep") == before


def test_rerun_that_fails_on_its_data_changes_nothing(finished, capsys):
    """The recorded recipe, unchanged, but its data file now broken: the data check fails after the run directory
    was found, and still nothing in it is written (the config record included)."""
    out, args = finished
    data = out / "train.json"
    good = data.read_bytes()
    before = snapshot(out / "keep")
    try:
        data.write_text('{"data": [{"title": "x", "paragraphs": [{"context": 1}]}]}')
        code, _, err = rerun_in_process(args, capsys, "train.max_steps=3")  # a longer run: a resume, not a no-op
    finally:
        data.write_bytes(good)
    assert code == 2 and len(err) == 1 and str(data) in err[0], err
    assert snapshot(out / "keep") == before


def test_rerun_of_a_finished_run_has_nothing_to_do(finished, capsys):
    out, args = finished
    before = snapshot(out / "keep")
    code, stdout, err = rerun_in_process(args, capsys, "train.log_every_steps=2")  # a safe change, still a no-op
    assert code == 0 and "already finished (2 of 2 steps); nothing to do" in stdout, (stdout, err)
    assert snapshot(out / "keep") == before


def test_resume_may_change_logging_and_a_longer_max_steps(tiny_recipe, tmp_path):
    args = ["finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "grow", "train.max_steps=3",
                                                                 "checkpoint.every_steps=1", "train.stop_at_step=2")]
    run_cli(*args)
    proc = run_cli(*args, "train.max_steps=4", "train.stop_at_step=null", "train.log_every_steps=2")
    changed = [line for line in proc.stdout.splitlines() if line.startswith("resuming with changed settings")]
    assert len(changed) == 1, proc.stdout
    for change in ("train.log_every_steps: 1 -> 2", "train.max_steps: 3 -> 4", "train.stop_at_step: 2 -> None"):
        assert change in changed[0], changed[0]
    assert [r["step"] for r in read_metrics(tmp_path / "grow") if "loss" in r] == [1, 2, 4]
    shorter = run_cli(*args, "train.max_steps=2", check=False)
    assert shorter.returncode == 2 and "train.max_steps: recorded 4, now 2" in shorter.stderr, shorter.stderr
