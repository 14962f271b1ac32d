"""The README and docs/ say what they do: every ```python example runs, and every `tuneforge ...` command of a fenced
shell block parses as written and then either runs (in this process, in a scratch directory beside the shipped
assets, with tiny-run overrides appended: tests/tiny_recipes.py), has its multi-process launch checked (the recipe
validated at that process count and the torchrun command built, torchrun not started), or is listed below with the
reason it cannot run here. Nothing is skipped silently."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SQUAD_DEV
from tests.tiny_recipes import one_torch_thread, skip_report_plots, tiny_run_overrides  # noqa: F401 (autouse)
from tuneforge import cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS_NETWORK = {
    "tuneforge eval --run runs/quickstart --harness hellaswag,my_task.yaml --harness-args num_fewshot=0 limit=100":
        "downloads the hellaswag task data",
    "tuneforge push --run runs/quickstart --repo-id me/quickstart-lora [--private]": "uploads to the Hub",
    "tuneforge push --run runs/llama3.2-1b-squad-sft --repo-id me/llama3.2-1b-squad-sft --private":
        "uploads to the Hub",
}
NOT_RUN = {  # subcommands that parse but do not run here
    "serve": "serves until stopped; tests/e2e/test_serve.py starts the server and queries it",
    "query": "needs a running server; tests/e2e/test_serve.py runs it against one",
}
PLACEHOLDERS = {"FILE": "recipes/llama3_2_1b_squad_peft.yaml"}  # a recipe whose batch divides over 32 processes
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes")
EVAL_LIMIT = "4"  # `eval --limit N` runs with N = 4: same code, fewer questions


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every ``` block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def commands(path: Path) -> dict[str, list[str]]:
    """Every `tuneforge ...` command of the non-Python, non-YAML blocks, in order, once each: its words (shell
    quoting and comments removed) under their space-joined text."""
    found = {}
    for lang, text in fenced_blocks(path):
        if lang in ("python", "yaml"):
            continue
        for line in text.splitlines():
            inner = re.search(r"\$\((tuneforge [^)]*)\)", line)  # sbatch $(tuneforge slurm ...)
            line = inner.group(1) if inner else line.strip()
            if line.startswith("tuneforge "):
                words = shlex.split(line, comments=True)
                found.setdefault(" ".join(words), words)
    return found


def inline_commands(path: Path) -> dict[str, list[str]]:
    """`tuneforge ...` code spans with arguments in the prose (outside fenced blocks), alternatives `a|b` reduced to
    their first. The bad-input page's are the bad-input matrix's own tests (tests/e2e/test_bad_input.py)."""
    prose = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    found = {}
    for span in re.findall(r"`(tuneforge [^`]+)`", prose):
        words = [w if w.startswith("-") or "|" not in w else w.split("|")[0] for w in shlex.split(span)]
        if len(words) > 2:
            found.setdefault(span, words)
    return found


def argv_of(words: list[str]) -> list[str]:
    """The arguments after `tuneforge`, optional `[--flag value]` groups included, placeholders filled."""
    argv, optional = [], False
    for word in words[1:]:
        if word.startswith("[-"):
            word, optional = word[1:], True
        if optional and word.endswith("]"):
            word, optional = word[:-1], False
        argv.append(PLACEHOLDERS.get(word, word))
    return argv


def assert_parses(argv: list[str]) -> None:
    parser = cli.build_parser()
    args, rest = parser.parse_known_args(argv)  # argparse exits (code 2) on a bad command
    assert all("=" in w and not w.startswith("-") for w in rest), f"unrecognized arguments {rest}"


def with_speed(argv: list[str], tiny_models) -> list[str]:
    if argv[0] in ("finetune", "prepare-data", "plan") and "-c" in argv:
        return argv + tiny_run_overrides(Path(argv[argv.index("-c") + 1]), tiny_models)
    if argv[0] == "eval":
        if "--limit" in argv:
            i = argv.index("--limit")
            argv = argv[:i] + argv[i + 2:]
        return argv + ["--limit", EVAL_LIMIT]
    return argv


def check_launch(argv: list[str], monkeypatch, capsys) -> None:
    """The recipe validates at the launch's process count and torchrun gets a well-formed command."""
    from tuneforge.launch import torchrun_command

    launched = []
    monkeypatch.setattr("tuneforge.launch.launch_torchrun", lambda args: launched.append(torchrun_command(args)) or 0)
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert launched and launched[0][1:3] == ["-m", "torch.distributed.run"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch directory that sees the shipped recipes and assets, the model `make setup` links at models/ (a
    launch check resolves the quickstart's GGUF file, as the launcher does), plus the files the examples name."""
    for name in ("assets", "recipes", "models"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copy(SQUAD_DEV, tmp_path / "other_dev.json")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Context: Tom has a red ball. Question: What does Tom have? '
                                            'Answer:"}\n{"context": "The sky is blue.", "question": "What is blue?"}\n')
    monkeypatch.chdir(tmp_path)
    skip_report_plots(monkeypatch)
    return tmp_path


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_command_parses_and_runs_or_says_why_not(doc: Path, workspace, tiny_models, monkeypatch, capsys):
    for command, words in commands(doc).items():
        argv = argv_of(words)
        if command in NEEDS_NETWORK:
            continue
        assert_parses(argv)
        if argv[0] in NOT_RUN:
            continue
        if any(flag in argv for flag in LAUNCH_FLAGS):
            check_launch(argv, monkeypatch, capsys)
        else:
            assert cli.main(with_speed(argv, tiny_models)) == 0, f"{command}: {capsys.readouterr().err}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "bad-input.md"], ids=lambda d: d.name)
def test_every_inline_command_parses(doc: Path, workspace, tiny_models):
    """Commands quoted in sentences name runs and files of the reader's own (runs/NAME, FILE): they must parse as
    written; the one that needs nothing of the reader's also runs."""
    for span, words in inline_commands(doc).items():
        argv = argv_of(words)
        assert_parses(argv)
        if argv == ["finetune", "--help-config"]:
            assert cli.main(argv) == 0, span


def test_listed_exceptions_are_still_in_the_docs():
    everywhere = {c: words for doc in DOCS for c, words in commands(doc).items()}
    assert set(NEEDS_NETWORK) <= set(everywhere)
    for command in NEEDS_NETWORK:
        assert_parses(argv_of(everywhere[command]))


def test_python_examples_run(workspace):
    """The examples of a page run in order in one namespace, as in a notebook."""
    examples = [(doc, text) for doc in DOCS for lang, text in fenced_blocks(doc) if lang == "python"]
    assert any(doc.name == "python-api.md" for doc, _ in examples)
    namespaces: dict[Path, dict] = {}
    for doc, text in examples:
        exec(compile(text, str(doc), "exec"), namespaces.setdefault(doc, {}))
