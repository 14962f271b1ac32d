"""data.prompt_style chat: prompt/answer pairs become chat turns, in training, validation, SQuAD scoring and
generate --examples alike (stories260K with a ChatML template, as chat models such as SmolLM2 and Qwen use)."""
import json

import pytest
import yaml

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN, STORIES, cli_in_process, run_cli, tiny_overrides
from tuneforge.config import load_config
from tuneforge.data import IGNORE, load_records
from tuneforge.data.tokenize import chat_prompts_for, fit_chat_records, tokenize_chat

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "Answer with a short phrase from the text."


def chat_config(*extra):
    return load_config({"model": {"name_or_path": "assets/models/stories260K"},
                        "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}, "prompt_style": "chat",
                                 "chat_template": CHATML, "system_prompt": SYSTEM, "seq_length": 256}},
                       list(extra), check_paths=False)


def test_only_the_answer_and_its_end_of_turn_are_labelled(tok):
    cfg = chat_config()
    chat = chat_prompts_for(cfg.data, tok)
    records = load_records(str(SQUAD_TRAIN), "squad", 4)
    examples, _ = tokenize_chat(fit_chat_records(records, "Context: {context} Question: {question} Answer:", chat,
                                                 tok, 256, "x"), tok, 256, False, "x", "auto", chat.template)
    for record, ex in zip(records, examples):
        text = tok.decode(ex.input_ids)
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nContext: ")
        labelled = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
        # the answer and the template's end of turn, nothing of the system or user turns
        assert labelled.replace(" ", "") == f"{record.completion.strip()}<|im_end|>\n".replace(" ", ""), labelled
        assert len(ex.input_ids) <= 256


def test_a_long_context_is_cut_and_the_answer_kept(tok):
    cfg = chat_config()
    chat = chat_prompts_for(cfg.data, tok)
    records = load_records(str(SQUAD_TRAIN), "squad", 40)
    fitted = fit_chat_records(records, "Context: {context} Question: {question} Answer:", chat, tok, 320, "x")
    cut = [(r, f) for r, f in zip(records, fitted) if f.fields["context"] != r.fields["context"]]
    assert len(cut) >= 10  # 320 tokens of this 512-token vocabulary hold few whole SQuAD paragraphs
    for record, fitted_record in cut:
        assert fitted_record.messages[-1] == {"role": "assistant", "content": record.completion.strip()}
        context, answer = fitted_record.fields["context"], record.fields.get("answer", "")
        assert context in record.fields["context"] and answer in context  # a window that keeps the answer
        rendered = tok.apply_chat_template(fitted_record.messages, tokenize=False, chat_template=CHATML)
        assert len(tok(rendered, add_special_tokens=False)["input_ids"]) <= 320


def test_a_chat_run_trains_scores_and_shows_examples_through_its_chat_template(tmp_path):
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(STORIES)}, "peft": {"method": "lora", "lora_rank": 4, "lora_alpha": 8},
        "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}, "prompt_style": "chat",
                 "chat_template": CHATML, "system_prompt": SYSTEM}}))
    run_cli("finetune", "-c", str(recipe),
            *tiny_overrides(tmp_path, "chat", "train.max_steps=2", f"data.validation.path={SQUAD_DEV}",
                            "data.validation.format=squad", "data.validation.limit=4"))
    recorded = yaml.safe_load((tmp_path / "chat/config.yaml").read_text())["data"]
    assert recorded["prompt_style"] == "chat" and recorded["chat_template"] == CHATML
    result = json.loads(cli_in_process("eval", "--run", str(tmp_path / "chat"), "--limit", "3").strip().splitlines()[-1])
    assert result["squad_prompt"] == "chat" and result["squad_questions"] == 3
    base = json.loads(cli_in_process("eval", "--run", str(tmp_path / "chat"), "--base", "--limit", "3",
                                     "data.prompt_style=plain", "data.system_prompt=null").strip().splitlines()[-1])
    assert base["squad_prompt"] == "plain"
    shown = cli_in_process("generate", "--run", str(tmp_path / "chat"), "--examples", "2", "--max-new-tokens", "4")
    assert shown.count("Q: ") == 2


def test_chat_prompts_are_refused_for_formats_without_a_prompt():
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match="data.prompt_style: chat renders prompt/answer pairs as chat turns"):
        chat_config("data.train.format=text")
    with pytest.raises(UserError, match="data.system_prompt: needs data.prompt_style: chat"):
        chat_config("data.prompt_style=plain")
