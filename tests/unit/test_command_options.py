"""The options of the commands that read a run (tuneforge/config/commands.py): the subparsers built from them parse
every command line as the hand-written ones did, into the same checked options that the Python API constructs."""
import dataclasses

import pytest

from tuneforge import api, cli
from tuneforge.config.commands import (EvalOptions, ExportOptions, GenerateOptions, MergeOptions, PushOptions,
                                       ReportOptions, RunOptions, ServeOptions)
from tuneforge.errors import UserError

CONVERTED = [EvalOptions, GenerateOptions, ReportOptions, ExportOptions, PushOptions, MergeOptions, ServeOptions]


def parsed(monkeypatch, *argv: str):
    """The options object main() hands the command (the command itself is not run)."""
    got = []
    monkeypatch.setitem(cli.COMMANDS, argv[0], lambda opts: got.append(opts) or 0)
    assert cli.main(list(argv)) == 0
    return got[0]


def test_every_command_of_config_commands_is_converted_and_every_field_has_a_one_line_help():
    assert set(RunOptions.__subclasses__()) == set(CONVERTED)
    for options in CONVERTED:
        assert options.COMMAND and options.SUMMARY and options.__doc__
        for f in dataclasses.fields(options):
            assert f.metadata["help"] and "\n" not in f.metadata["help"], (options.COMMAND, f.name)


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--run", "r"], EvalOptions(run="r")),
    (["eval", "--run", "r", "a.b=1", "--limit", "3", "c.d=2", "--base", "--dataset", "d.json", "--batch-size", "4"],
     EvalOptions(run="r", overrides=["a.b=1", "c.d=2"], limit=3, base=True, dataset="d.json", batch_size=4)),
    (["eval", "--run", "r", "--harness", "t1,t2", "--harness-args", "num_fewshot=0", "limit=5"],
     EvalOptions(run="r", harness="t1,t2", harness_args=["num_fewshot=0", "limit=5"])),
    (["generate", "--run", "r", "--prompt", "a", "--prompt", "b", "--temperature", "0.7", "--top-p", "0.9",
      "--seed", "1", "--json"],
     GenerateOptions(run="r", prompt=["a", "b"], temperature=0.7, top_p=0.9, seed=1, json=True)),
    (["generate", "--run", "r", "--examples", "5", "--base", "--max-new-tokens", "8"],
     GenerateOptions(run="r", examples=5, base=True, max_new_tokens=8)),
    (["generate", "--run", "r", "--input", "i.jsonl", "--output", "o.jsonl", "--batch-size", "3",
      "--stop-at-newline"],
     GenerateOptions(run="r", input="i.jsonl", output="o.jsonl", batch_size=3, stop_at_newline=True)),
    (["report", "--run", "r"], ReportOptions(run="r")),
    (["export", "--run", "r", "--out", "o"], ExportOptions(run="r", out="o", format="vllm", quant="f16")),
    (["export", "--run", "r", "--format", "gguf", "--quant", "q8_0", "--out", "m.gguf", "--ollama", "--overwrite"],
     ExportOptions(run="r", format="gguf", quant="q8_0", out="m.gguf", ollama=True, overwrite=True)),
    (["push", "--run", "r", "--repo-id", "me/x", "--private"], PushOptions(run="r", repo_id="me/x", private=True)),
    (["merge", "--run", "r", "--out", "o", "--dtype", "bfloat16"], MergeOptions(run="r", out="o", dtype="bfloat16")),
    (["serve", "--run", "r", "--port", "0", "--engine", "transformers", "--max-concurrent", "4"],
     ServeOptions(run="r", port=0, engine="transformers", max_concurrent=4)),
])
def test_command_lines_parse_into_the_options_the_api_builds(monkeypatch, argv, expected):
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    assert parsed(monkeypatch, *argv) == expected


def test_an_environment_default_is_read_by_the_parser_and_the_dataclass_alike(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_API_KEY", "k1")
    assert parsed(monkeypatch, "serve", "--run", "r").api_key == "k1" == ServeOptions(run="r").api_key
    assert parsed(monkeypatch, "serve", "--run", "r", "--api-key", "k2").api_key == "k2"


@pytest.mark.parametrize("argv, message", [
    (["eval"], "the following arguments are required: --run"),
    (["eval", "--run", "r", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["export", "--run", "r"], "the following arguments are required: --out"),
    (["merge", "--run", "r", "--out", "o", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["generate", "--run", "r"], "one of the arguments --prompt --examples --input is required"),
    (["generate", "--run", "r", "--prompt", "a", "--examples", "2"], "argument --examples: not allowed with argument "
                                                                       "--prompt"),
    (["query", "--url", "u", "--prompt", "p", "--top-k", "x"], "argument --top-k: invalid int value: 'x'"),
])
def test_bad_command_lines_get_argparse_s_one_line_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("build, message", [
    (lambda: EvalOptions(run="r", batch_size=0), "--batch-size: must be >= 1, got 0"),
    (lambda: EvalOptions(run="r", limit=0), "--limit: must be >= 1, got 0"),
    (lambda: EvalOptions(run="r", harness_args=["limit=1"]), "eval: --harness-args needs --harness TASKS"),
    (lambda: EvalOptions(run="r", harness="t", dataset="d.json"), "--dataset and overrides apply to the built-in"),
    (lambda: GenerateOptions(run="r", prompt=["a"], max_new_tokens=0), "--max-new-tokens: must be >= 1, got 0"),
    (lambda: GenerateOptions(run="r", input="i.jsonl"), "generate: --input and --output go together"),
    (lambda: GenerateOptions(run="r"), "generate: one of --prompt, --examples and --input is required"),
    (lambda: GenerateOptions(run="r", prompt=["a"], top_k=5), "--top-p / --top-k apply to sampling"),
    (lambda: GenerateOptions(run="r", prompt=["a"], temperature=1.0, top_p=1.5), "--top-p: must be in (0, 1]"),
    (lambda: ExportOptions(run="r", out="o", quant="q8_0"), "--quant, --ollama and --overwrite go with --format gguf"),
    (lambda: ExportOptions(run="r", out="o", format="gguf", keep_adapter=True), "--keep-adapter goes with --format "
                                                                                 "vllm"),
    (lambda: ServeOptions(run="r", port=70000), "--port: must be in 0..65535, got 70000"),
])
def test_options_are_checked_when_built_from_either_side(build, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_a_bad_option_stops_the_command_before_it_loads_anything(capsys):
    assert cli.main(["eval", "--run", "/no/such/run", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "tuneforge: error: --batch-size: must be >= 1, got 0\n"


def test_the_python_api_takes_every_field_of_the_options(monkeypatch):
    seen = []
    monkeypatch.setattr("tuneforge.eval.evaluate.evaluate_run", lambda opts: seen.append(opts) or {})
    monkeypatch.setattr("tuneforge.eval.batch.answer_prompts", lambda opts: seen.append(opts) or ["out"] * 2)
    api.evaluate("runs/x", limit=2, batch_size=8)
    assert seen.pop() == EvalOptions(run="runs/x", limit=2, batch_size=8)
    api.evaluate("runs/x", True, None, None, ["a.b=1"])  # the positional signature of before
    assert seen.pop() == EvalOptions(run="runs/x", base=True, overrides=["a.b=1"])
    assert api.generate("runs/x", "p", 5, 0.5, top_k=4, seed=3) == "out"
    assert seen.pop() == GenerateOptions(run="runs/x", prompt=["p"], max_new_tokens=5, temperature=0.5, top_k=4,
                                         seed=3)
    with pytest.raises(TypeError, match="no_such_flag"):
        api.evaluate("runs/x", no_such_flag=1)


def test_eval_batch_size_reaches_lm_eval_unless_harness_args_name_one(monkeypatch):
    from tuneforge.eval.evaluate import evaluate_run

    calls = []
    monkeypatch.setattr("tuneforge.eval.evaluate.run_harness", lambda run, tasks, args, base, limit: calls.append(args))
    evaluate_run(EvalOptions(run="r", harness="t", batch_size=4))
    evaluate_run(EvalOptions(run="r", harness="t", batch_size=4, harness_args=["batch_size=2"]))
    assert calls == [["batch_size=4"], ["batch_size=4", "batch_size=2"]]  # the later one wins: 2
