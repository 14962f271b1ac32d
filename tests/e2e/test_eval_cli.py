"""evaluate / generate / report / export / push through the real command line, on one tiny trained run."""
import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SQUAD_DEV, read_metrics, run_cli, tiny_overrides
from tuneforge.eval.squad import squad_scores

EVAL = ["data.validation.path=" + str(SQUAD_DEV), "data.validation.format=squad", "data.validation.limit=8",
        "eval.squad.every_steps=2", "eval.squad.limit=8", "eval.squad.max_new_tokens=8",
        "train.val_every_steps=2", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def run(tiny_recipe, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    out = run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(root, "r", *EVAL))
    assert "squad EM" in out.stdout
    return root / "r"


def dev_ids(n):
    doc = json.loads(Path(SQUAD_DEV).read_text())
    return [qa["id"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]][:n]


def test_squad_is_logged_during_training(run):
    rows = {r["step"]: r for r in read_metrics(run)}
    assert [s for s, r in sorted(rows.items()) if "squad_f1" in r] == [0, 2, 4]
    for step in (0, 2, 4):
        assert 0 <= rows[step]["squad_em"] <= rows[step]["squad_f1"] <= 100
        assert "val_loss" in rows[step]  # one line per step: validation and SQuAD together
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/squad_f1")] == [0, 2, 4]
    assert [e.value for e in events.Scalars("eval/squad_f1")] == pytest.approx([rows[s]["squad_f1"] for s in (0, 2, 4)])


def test_eval_prints_scores_and_writes_official_predictions(run):
    out = run_cli("eval", "--run", str(run))
    result = json.loads(out.stdout)
    assert {"val_loss", "perplexity", "squad_em", "squad_f1"} <= result.keys() and result["squad_questions"] == 8
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    predictions = json.loads((run / "eval/squad_predictions.json").read_text())
    assert list(predictions) == dev_ids(8) and all(isinstance(v, str) and "\n" not in v for v in predictions.values())
    doc = json.loads(Path(SQUAD_DEV).read_text())
    refs = {qa["id"]: [a["text"] for a in qa["answers"]] for a in doc["data"] for p in a["paragraphs"]
            for qa in p["qas"] if qa["id"] in predictions}
    assert squad_scores(predictions, refs) == {"squad_em": result["squad_em"], "squad_f1": result["squad_f1"]}
    assert json.loads((run / "eval/scores.json").read_text()) == result
    # the reloaded final model answers exactly as the trained model did at its last step
    last = read_metrics(run)[-1]
    assert (result["squad_em"], result["squad_f1"]) == (last["squad_em"], last["squad_f1"])
    assert result["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_eval_base_is_the_model_before_training(run):
    result = json.loads(run_cli("eval", "--run", str(run), "--base").stdout)
    step0 = read_metrics(run)[0]
    assert result["model"] == "base"
    assert result["val_loss"] == pytest.approx(step0["val_loss"], rel=1e-5)
    assert (result["squad_em"], result["squad_f1"]) == (step0["squad_em"], step0["squad_f1"])
    assert (run / "eval/base/scores.json").is_file() and (run / "eval/base/squad_predictions.json").is_file()


def test_eval_limit_dataset_and_overrides(run, tmp_path):
    lines = [{"input": "Once upon a time", "output": " there was a girl"}, {"input": "The cat", "output": " sat"}]
    data = tmp_path / "io.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = json.loads(run_cli("eval", "--run", str(run), "--dataset", str(data)).stdout)
    assert set(result) == {"model", "val_loss", "perplexity"}  # no SQuAD questions in an input/output file
    limited = json.loads(run_cli("eval", "--run", str(run), "--limit", "3", "eval.squad.max_new_tokens=2").stdout)
    assert limited["squad_questions"] == 3
    preds = json.loads((run / "eval/squad_predictions.json").read_text())
    assert list(preds) == dev_ids(3)
    bad = run_cli("eval", "--run", str(run), "eval.squad.max_new_tokens=0", check=False)
    assert bad.returncode == 2 and "eval.squad.max_new_tokens: must be >= 1" in bad.stderr
    missing = run_cli("eval", "--run", str(tmp_path), check=False)
    assert missing.returncode == 2 and "not a tuneforge run directory" in missing.stderr


def test_eval_batch_size_sets_the_batches_and_leaves_the_scores(run, tmp_path, monkeypatch):
    import tuneforge.eval.evaluate as ev
    from tuneforge import evaluate

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    default = evaluate(copy)
    loss_batches, answer_batches = [], []
    build_batches, generate = ev.build_eval_batches, ev.generate
    monkeypatch.setattr(ev, "build_eval_batches", lambda examples, size, *a, **k: loss_batches.append(size)
                        or build_batches(examples, size, *a, **k))
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, *a, **k: answer_batches.append(len(prompts))
                        or generate(model, tok, prompts, *a, **k))
    result = evaluate(copy, batch_size=3)  # as `tuneforge eval --batch-size 3`
    assert loss_batches == [3] and answer_batches == [3, 3, 2]  # the run's own: micro batch 8, eval.squad 16
    assert result["val_loss"] == pytest.approx(default["val_loss"], rel=1e-5)
    assert (result["squad_em"], result["squad_f1"]) == (default["squad_em"], default["squad_f1"])


def test_batch_generate_writes_one_line_per_input_in_order(run, tmp_path):
    from tuneforge.eval.generate import generate
    from tuneforge.run.model import load_run_model

    rows = [{"prompt": "Once upon a time", "id": "a"},
            {"context": "Lily has a red ball.", "question": "What color is the ball?", "id": "b"},
            {"input": "The little dog", "output": "ran away"},
            {"prompt": "Tom and Sue went to the"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dst = tmp_path / "out.jsonl"
    run_cli("generate", "--run", str(run), "--input", str(src), "--output", str(dst), "--max-new-tokens", "10",
            "--batch-size", "3")
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(got) == len(rows)
    assert [g.get("id") for g in got] == ["a", "b", None, None] and got[2]["reference"] == "ran away"
    prompts = ["Once upon a time", "Context: Lily has a red ball. Question: What color is the ball? Answer:",
               "The little dog", "Tom and Sue went to the"]
    model, tok, _ = load_run_model(run)
    one_by_one = [generate(model, tok, [p], 10)[0] for p in prompts]  # no padding at all
    assert [g["output"] for g in got] == one_by_one

    sampled = tmp_path / "sampled.jsonl"
    run_cli("generate", "--run", str(run), "--input", str(src), "--output", str(sampled), "--max-new-tokens", "16",
            "--batch-size", "3", "--temperature", "1.0", "--top-k", "50", "--seed", "1")
    from tuneforge.eval.generate import Sampling

    def sample(seed):
        return generate(model, tok, prompts, 16, batch_size=3, sampling=Sampling(1.0, None, 50, seed=seed))
    first = [json.loads(line)["output"] for line in sampled.read_text().splitlines()]
    assert first == sample(1) and first != sample(2)  # the seed alone decides the samples


def test_generate_rejects_bad_batch_input(run, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"text": "no usable field"}\n')
    proc = run_cli("generate", "--run", str(run), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                   check=False)
    assert proc.returncode == 2 and f"{src}:2: expected a string field 'prompt'" in proc.stderr
    proc = run_cli("generate", "--run", str(run), "--input", str(src), check=False)
    assert proc.returncode == 2 and "--input and --output go together" in proc.stderr


def report_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_report_has_plots_config_and_scores_and_no_external_resources(run):
    html = (run / "report.html").read_text()  # written at the end of training
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?(https?:|//)", html)
    images = report_images(html)
    assert len(images) == 4  # loss, lr, tokens/s, SQuAD
    import matplotlib.image as mpimg

    for png in images:
        pixels = mpimg.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01  # drawn, not blank
    assert "peft.lora_rank" in html and "squad_f1" in html

def test_report_command_adds_the_eval_scores(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval/base").mkdir(parents=True, exist_ok=True)
    (copy / "eval/scores.json").write_text(json.dumps({"model": "final", "val_loss": 3.25, "squad_f1": 12.5}))
    (copy / "eval/base/scores.json").write_text(json.dumps({"model": "base", "val_loss": 6.5, "squad_f1": 1.0}))
    out = run_cli("report", "--run", str(copy))
    assert out.stdout.strip() == str(copy / "report.html")
    html = (copy / "report.html").read_text()
    row = re.search(r"<tr><td>tuneforge eval: base model</td>(.*?)</tr>", html).group(1)
    assert "<td class='num'>6.5</td>" in row and "<td class='num'>1</td>" in row
    assert "<tr><td>tuneforge eval: fine-tuned</td>" in html and "<td class='num'>12.5</td>" in html


def browser() -> str | None:
    return next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b), None)


@pytest.mark.skipif(browser() is None, reason="no headless browser installed (.ci/run installs chromium)")
def test_report_opens_in_a_headless_browser_with_every_image_decoded(run, tmp_path):
    # A probe page loads the report in an iframe and writes what the browser made of it into its own DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(f"""<!DOCTYPE html><html><body><iframe id=f src="{(run / 'report.html').as_uri()}"></iframe>
<script>document.getElementById('f').onload = function () {{
  var d = this.contentDocument, imgs = Array.from(d.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 100 && i.naturalHeight > 100; }});
  document.title = 'images ' + ok.length + '/' + imgs.length + ' tables ' + d.querySelectorAll('table').length;
}};</script></body></html>""")
    proc = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<title>images 4/4 tables 2</title>" in proc.stdout, proc.stdout[:500]
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors


def test_export_merged_model_gives_the_adapter_logits(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.run.model import load_run_model

    out = run_cli("export", "--run", str(run), "--format", "vllm", "--out", str(tmp_path / "merged"))
    assert out.stdout.strip() == f"vllm serve {tmp_path / 'merged'} --served-model-name r"
    assert not (tmp_path / "merged/adapter_config.json").exists()
    # Both sides in float64, so the comparison sees the merge (fp32 weights W + BA, rounded once) and not fp32
    # matmul rounding, which alone moves logits of ~10 by up to 2e-5 depending on the thread count.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    peft_model, _, _ = load_run_model(run)
    enc = AutoTokenizer.from_pretrained(tmp_path / "merged")("Once upon a time there was", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, peft_model.double()(**enc).logits, atol=1e-5)
    again = run_cli("export", "--run", str(run), "--out", str(tmp_path / "merged"), check=False)
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr


def test_export_keep_adapter_prints_the_lora_serving_command(run, tmp_path):
    out = run_cli("export", "--run", str(run), "--out", str(tmp_path / "lora"), "--keep-adapter")
    adapter = tmp_path / "lora/adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert out.stdout.strip() == (f"vllm serve {base} --enable-lora --lora-modules r={adapter} "
                                  "--max-lora-rank 8")


def test_push_fails_cleanly_offline_or_without_a_token(run, tmp_path):
    offline = run_cli("push", "--run", str(run), "--repo-id", "me/x", check=False)  # run_cli sets HF_HUB_OFFLINE=1
    assert offline.returncode == 2 and offline.stderr.strip().splitlines() == [
        "tuneforge: error: push: the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set); unset it to upload"]
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN_PATH": str(tmp_path / "t")}
    anonymous = run_cli("push", "--run", str(run), "--repo-id", "me/x", check=False, env=env)
    assert anonymous.returncode == 2 and "not logged in to the Hugging Face Hub" in anonymous.stderr
    assert "Traceback" not in anonymous.stderr


def test_model_card_names_base_data_recipe_and_scores_and_no_secret(run, tmp_path):
    from tuneforge.hub import build_model_card

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config + "hub_token: hf_SECRETSECRET\n")
    (copy / "eval/base").mkdir(parents=True, exist_ok=True)
    (copy / "eval/scores.json").write_text(json.dumps({"model": "final", "val_loss": 3.25, "squad_f1": 12.5}))
    (copy / "eval/base/scores.json").write_text(json.dumps({"model": "base", "val_loss": 6.5, "squad_f1": 1.0}))
    card = build_model_card(copy)
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "hf_SECRETSECRET" not in card and "hub_token: <redacted>" in card
    assert "Fine-tuned from `" + str(Path(REPO / "assets/models/stories260K")) + "`" in card
    assert "- train: `train.json` (squad, first 64 examples)" in card
    assert "- validation: `dev.json` (squad, first 8 examples)" in card
    assert "| base model | 6.50 | 1.00 |" in card and "| fine-tuned | 3.25 | 12.50 |" in card
    assert "lora_rank: 4" in card  # the recipe


def test_harness_runs_a_local_lm_eval_task_on_the_adapter(run):
    pytest.importorskip("lm_eval")
    task = "tests/fixtures/harness/tiny_choice.yaml"
    out = run_cli("eval", "--run", str(run), "--harness", task, "--harness-args", "batch_size=4",
                  env={"HF_DATASETS_OFFLINE": "1"})
    acc = json.loads(out.stdout)["harness"]["tuneforge_tiny_choice"]["acc,none"]
    assert json.loads((run / "eval/harness.json").read_text())["results"]["tuneforge_tiny_choice"]["acc,none"] == acc
    assert acc == expected_choice_accuracy(run, REPO / "tests/fixtures/harness/tiny_choice.jsonl")


def expected_choice_accuracy(run, data: Path) -> float:
    """The same task scored by hand: pick the choice with the highest summed log-probability."""
    from tuneforge.run.model import load_run_model

    model, tok, _ = load_run_model(run)
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    right = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            ctx = tok(doc["question"])["input_ids"]
            full = tok(doc["question"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)
