"""The plumbing around evaluation: which sets are evaluated, prompt fitting, config checks, harness arguments."""
import sys
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN, STORIES
from tuneforge.config import load_config
from tuneforge.config.load import to_dict
from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.data import source_name
from tuneforge.data.records import Record
from tuneforge.errors import UserError
from tuneforge.eval.evaluate import fit_prompt
from tuneforge.config.sources import validation_sets
from tuneforge.eval.evaluate import squad_source


def base_cfg(**extra):
    return {"model": {"name_or_path": str(STORIES)}, "data": {"train": {"path": str(SQUAD_TRAIN)}}, **extra}


def test_validation_sets_accepts_none_one_list_or_mapping():
    a, b = DataSource(path="x/a.json"), DataSource(path="y/a.json", format="input_output")
    assert validation_sets(DataConfig(validation=None)) == []
    assert validation_sets(DataConfig(validation=a)) == [("a", a)]
    named = SimpleNamespace(name="dev", path="z.jsonl", format="squad")
    assert validation_sets(DataConfig(validation=[named])) == [("dev", named)]
    assert validation_sets(DataConfig(validation={"dev": a, "test": b})) == [("dev", a), ("test", b)]
    # as in training: two sets of one name would report one val_loss/<name>
    with pytest.raises(UserError, match="data.validation: two sets are named 'a'; give each a distinct `name`"):
        validation_sets(DataConfig(validation=[a, b]))


def test_eval_names_validation_sets_as_training_does():
    sets = [DataSource(path="data/dev.json"), DataSource(path="org/squad_v2"), DataSource(path="d/x.jsonl", name="held"),
            DataSource(path="saved/arrow_dir")]
    data = DataConfig(validation=sets)
    assert [name for name, _ in validation_sets(data)] == [source_name(s) for s in sets] == \
        ["dev", "squad_v2", "held", "arrow_dir"]


def test_squad_source_prefers_dataset_then_eval_path_then_squad_validation():
    cfg = load_config(base_cfg(data={"train": {"path": str(SQUAD_TRAIN)},
                                     "validation": {"path": str(SQUAD_DEV), "limit": 7}},
                               eval={"squad": {"limit": None}}))
    assert squad_source(cfg).path == str(SQUAD_DEV) and squad_source(cfg).limit == 7
    assert squad_source(cfg, limit=3).limit == 3
    assert squad_source(cfg, dataset=str(SQUAD_TRAIN)).path == str(SQUAD_TRAIN)
    cfg.eval.squad.path = str(SQUAD_TRAIN)
    assert (squad_source(cfg).path, squad_source(cfg).limit) == (str(SQUAD_TRAIN), None)


@pytest.mark.parametrize("section, message", [
    ({"squad": {}}, "eval.squad: needs eval.squad.path (a SQuAD json) or a squad-format data.validation set"),
    ({"squad": {"path": "nope.json"}}, "eval.squad.path: no such file 'nope.json'"),
    ({"squad": {"path": str(SQUAD_DEV), "max_new_tokens": 0}}, "eval.squad.max_new_tokens: must be >= 1, got 0"),
    ({"squad": {"path": str(SQUAD_DEV), "every_steps": 0}}, "eval.squad.every_steps: must be >= 1 or null"),
    ({"squad": {"path": str(SQUAD_DEV), "max_new_tokns": 3}}, "did you mean eval.squad.max_new_tokens?"),
])
def test_eval_config_errors_name_the_field(section, message):
    with pytest.raises(UserError, match="^<dict>") as err:
        load_config(base_cfg(eval=section))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_token_counts_are_not_redacted_but_tokens_are():
    cfg = load_config(base_cfg(eval={"squad": {"path": str(SQUAD_DEV), "max_new_tokens": 12}}))
    assert to_dict(cfg)["eval"]["squad"]["max_new_tokens"] == 12
    from tuneforge.config.load import _redact

    assert _redact({"hub_token": "hf_x", "max_new_tokens": 4}) == {"hub_token": "<redacted>", "max_new_tokens": 4}


def test_fit_prompt_cuts_the_context_from_its_end_without_looking_at_the_answer():
    tok = AutoTokenizer.from_pretrained(STORIES)
    context = " ".join(f"Sentence number {i} is here." for i in range(80))
    record = Record({"context": context, "question": "Which?", "answer": "Sentence number 79"}, " x",
                    truncatable="context")
    template = "Context: {context} Question: {question} Answer:"
    short = fit_prompt(record, template, tok, 60, "dev")
    assert len(tok(short)["input_ids"]) <= 60
    assert short.startswith("Context: Sentence number 0 is") and short.endswith(" Question: Which? Answer:")
    assert "number 79" not in short  # the window is not moved to the gold answer
    assert fit_prompt(record, template, tok, 10_000, "dev") == template.format(**record.fields)


def test_missing_lm_eval_names_the_extra(monkeypatch):
    from tuneforge.eval.harness import import_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'tuneforge\[eval\]'"):
        import_lm_eval()


def test_harness_args_are_checked_against_simple_evaluate():
    from tuneforge.eval.harness import parse_harness_args, parse_tasks

    def simple_evaluate(model, model_args=None, tasks=None, num_fewshot=None, limit=None, batch_size=None):
        pass
    assert parse_harness_args(["num_fewshot=5", "limit=0.5"], simple_evaluate) == {"num_fewshot": 5, "limit": 0.5}
    with pytest.raises(UserError, match="unknown argument 'fewshot'"):
        parse_harness_args(["fewshot=5"], simple_evaluate)
    with pytest.raises(UserError, match="expected key=value"):
        parse_harness_args(["limit"], simple_evaluate)
    assert parse_tasks("hellaswag, arc_easy") == (["hellaswag", "arc_easy"], [])
    with pytest.raises(UserError, match="no such task file 'missing.yaml'"):
        parse_tasks("missing.yaml")


@pytest.mark.parametrize("message, shown", [("", "ValueError"), ("\n  bad limit  \nmore detail", "bad limit")])
def test_lm_eval_refusing_the_run_is_one_line_even_without_a_message(monkeypatch, tmp_path, message, shown):
    from tuneforge.eval import harness

    def simple_evaluate(model, model_args=None, tasks=None, task_manager=None, batch_size=None):
        raise ValueError(message)

    class TaskManager:
        all_tasks = ["hellaswag"]

        def __init__(self, include_path=None):
            pass
    monkeypatch.setattr(harness, "import_lm_eval", lambda: (SimpleNamespace(simple_evaluate=simple_evaluate),
                                                            TaskManager))
    monkeypatch.setattr(harness, "model_args", lambda run_dir, base: {"pretrained": "x"})
    with pytest.raises(UserError, match=rf"^--harness: lm-eval rejected the run \({shown}\)$"):
        harness.run_harness(tmp_path, "hellaswag", [])
    assert not (tmp_path / "eval").exists()


def test_squad_questions_come_from_the_validation_sets_split(tmp_path):
    import datasets

    from tuneforge.eval.evaluate import build_squad_task

    def rows(question: str) -> dict:
        return {"id": ["q"], "context": ["Paris is in France."], "question": [question],
                "answers": [{"text": ["France"], "answer_start": [12]}]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows("train split?")),
                          "validation": datasets.Dataset.from_dict(rows("validation split?"))}).save_to_disk(
        tmp_path / "squad")
    cfg = load_config(base_cfg(data={"train": {"path": str(SQUAD_TRAIN)}, "validation": {
        "path": str(tmp_path / "squad"), "format": "squad", "split": "validation"}}))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    task = build_squad_task(cfg, squad_source(cfg), AutoTokenizer.from_pretrained(STORIES), model)
    assert [r.fields["question"] for r in task.records] == ["validation split?"]


def test_ranks_answer_alternate_batches_and_together_answer_like_one_process():
    """SquadTask.answer(rank, world_size) takes the batches one process would form, every world_size-th of them:
    the ranks' answers, merged, are the single process's answers, question for question."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.eval.evaluate import SquadTask
    from tuneforge.models.load import resolve_precision

    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    prompts = [f"Context: {name} has {n} red balls. Question: How many balls? Answer:"
               for n, name in enumerate(["Lily", "Tom", "Ben", "Sue", "Max", "Amy", "Sam"], start=2)]
    records = [Record({}, "", f"q{i}", ["x"]) for i in range(len(prompts))]
    task = SquadTask(records, prompts, max_new_tokens=5, batch_size=2)
    fp32 = resolve_precision("float32", "cpu")
    whole = task.answer(model, tok, fp32)
    shares = [task.answer(model, tok, fp32, rank, 3) for rank in range(3)]
    assert [sorted(s) for s in shares] == [["q0", "q1", "q6"], ["q2", "q3"], ["q4", "q5"]]
    assert {k: v for s in shares for k, v in s.items()} == whole and len(whole) == 7


def test_lockstep_ranks_make_as_many_synced_generate_calls_and_drop_the_padding(monkeypatch):
    """Under FSDP2 every forward is a collective: a rank with fewer batches pads with the first question (answers
    dropped), and every call keeps stepping until all ranks are done (synced_gpus)."""
    import torch

    from tuneforge.eval import evaluate

    calls = {}

    def fake_generate(model, tokenizer, prompts, *args, synced_gpus=False, **kwargs):
        calls.setdefault(model, []).append((prompts, synced_gpus))
        return [f"answer to {p}" for p in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    records = [Record({}, "", f"q{i}", ["x"]) for i in range(7)]
    task = evaluate.SquadTask(records, [f"p{i}" for i in range(7)], max_new_tokens=5, batch_size=2)
    shares = [task.answer(torch.nn.Linear(1, 1), None, None, rank, 3, lockstep=True) for rank in range(3)]
    assert [len(c) for c in calls.values()] == [2, 2, 2] and all(synced for c in calls.values() for _, synced in c)
    assert list(calls.values())[1][-1] == (["p0"], True)  # rank 1's padding call
    assert [sorted(s) for s in shares] == [["q0", "q1", "q6"], ["q2", "q3"], ["q4", "q5"]]
    assert shares[1] == {"q2": "answer to p2", "q3": "answer to p3"}
