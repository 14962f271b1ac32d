"""2-process runs under torchrun (gloo on CPU) against the single-process run of the same recipe and global batch."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import SQUAD_DEV, STORIES, read_metrics, run_cli, tiny_overrides
from tuneforge.launch import torchrun_command

pytestmark = pytest.mark.slow

# global batch 8: one process runs micro 4 x accumulation 2, two processes micro 4 x 1 each
COMMON = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=3", "data.train.limit=48",
          "data.seq_length=192"]


def run(recipe, tmp_path, name, *extra, nproc=1, check=True):
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    return run_cli("finetune", "-c", str(recipe), *launch, *tiny_overrides(tmp_path, name, *COMMON, *extra),
                   check=check)


def final_logits(final, peft_run: bool):
    tok = AutoTokenizer.from_pretrained(STORIES)
    enc = tok(["Context: Paris is in France. Question: Where is Paris? Answer:"], return_tensors="pt")
    if peft_run:
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32), final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(**enc).logits


def assert_same_curve(got, want):
    val_steps = [r["step"] for r in want if "val_loss" in r]
    assert val_steps == [r["step"] for r in got if "val_loss" in r] == [0, 2, 3]
    got_val, want_val = [r["val_loss"] for r in got if "val_loss" in r], [r["val_loss"] for r in want if "val_loss" in r]
    assert got_val == pytest.approx(want_val, rel=1e-6)
    got, want = [r for r in got if "loss" in r], [r for r in want if "loss" in r]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g["label_tokens"] == w["label_tokens"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)


STORY_ANSWERS = ["Can you help", "I'm sorry", "you", "Can", "Lily", "I'm", "help me", "sorry", "a ball", "Can you"]


def squad_options(tmp_path):
    """Questions whose gold answers are words the story model likes to write ('"I'm sorry', 'Can you help'), so
    its F1 is not zero (10 questions, in batches of 3: ranks 0 and 1 answer two batches each)."""
    context = "Once upon a time there was a little girl named Lily. She liked to play with a big ball in the park."
    qas = [{"id": f"q{i}", "question": f"What is thing {i}?", "answers": [{"text": a, "answer_start": 0}]}
           for i, a in enumerate(STORY_ANSWERS)]
    path = tmp_path / "story_squad.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return [f"eval.squad.path={path}", "eval.squad.every_steps=2", "eval.squad.batch_size=3",
            "eval.squad.max_new_tokens=6"]


def squad_curve(run_dir):
    return [(r["step"], r["squad_em"], r["squad_f1"]) for r in read_metrics(run_dir) if "squad_f1" in r]


def assert_same_squad_scores(got, want):
    """The (step, EM, F1) rows at steps 0, 2 and 3 are equal, and not all zero."""
    expected = squad_curve(want)
    assert [s for s, _, _ in expected] == [0, 2, 3] and any(f1 > 0 for _, _, f1 in expected), expected
    assert squad_curve(got) == expected


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ddp_and_fsdp2_match_one_process(tiny_recipe, tmp_path, method):
    """Every variant gives the single process's losses, gradient norms, validation losses, SQuAD scores (answered
    during training at steps 0, 2 and 3: the ranks answer alternate batches and gather the answers) and final
    logits."""
    # one Adam kernel on every side: FSDP2's DTensor shards take the foreach path, which rounds unlike fused
    same_kernel = ["train.optimizer.fused=false"]
    # 9 validation examples: the two ranks hold 5 and 4, i.e. 2 and 1 batches, so one rank pads with a label-free
    # batch to keep FSDP's collectives in step. Validating before step 1 and between steps guards FSDP2's state
    # after forwards without backward: full fine-tuning trains the root unit's weights (embeddings, final norm)
    validation = [f"data.validation.path={SQUAD_DEV}", "data.validation.format=squad", "data.validation.limit=9",
                  "train.val_every_steps=2"]
    squad = squad_options(tmp_path)
    if method == "full":
        # Every FSDP2 forward all-gathers weight shards, so the ranks generate in lockstep. Batches of 4 give rank 0
        # two batches and rank 1 one (it pads with a batch whose answers are dropped), and 24 new tokens let answers
        # end at their newline at different steps: without the padding or transformers' synced_gpus the ranks'
        # collectives fall out of step. Full fine-tuning trains the root unit's weights, which generating leaves
        # gathered: unless they are resharded, the gradient clipping misses their gradients (the grad norms differ).
        squad += ["eval.squad.batch_size=4", "eval.squad.max_new_tokens=24"]
    extra = same_kernel + validation + squad + (["peft=null", "train.optimizer.lr=0.0005"] if method == "full" else [])
    run(tiny_recipe, tmp_path, "one", *extra)
    want = final_logits(tmp_path / "one/final", method == "lora")
    variants = {"ddp": ["distributed.strategy=ddp"], "fsdp2": ["distributed.strategy=fsdp2"]}
    if method == "lora":  # HSDP (2 replicas x 1 shard) with CPU offload and activation checkpointing
        variants["hsdp"] = ["distributed.strategy=auto", "distributed.dp_replicate=2", "distributed.cpu_offload=true",
                            "distributed.activation_checkpointing=true"]
    for name, options in variants.items():
        out = run(tiny_recipe, tmp_path, name, *extra, *options, nproc=2)
        assert f"x 2 process(es) [{'ddp' if name == 'ddp' else 'fsdp2'}]" in out.stdout
        assert_same_curve(read_metrics(tmp_path / name), read_metrics(tmp_path / "one"))
        assert_same_squad_scores(tmp_path / name, tmp_path / "one")
        got = final_logits(tmp_path / name / "final", method == "lora")
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())


def test_fsdp2_stop_and_resume_continues_the_curve(tiny_recipe, tmp_path):
    steps = ["train.max_steps=4", "distributed.strategy=fsdp2", "checkpoint.every_steps=2"]
    run(tiny_recipe, tmp_path, "whole", *steps, nproc=2)
    out = run(tiny_recipe, tmp_path, "parts", *steps, "train.stop_at_step=2", nproc=2)
    assert "stopped after step 2 of 4" in out.stdout
    ckpt = tmp_path / "parts/checkpoints/step_2"
    assert (ckpt / "dcp").is_dir() and (ckpt / "rank_0.pt").is_file() and (ckpt / "rank_1.pt").is_file()
    out = run(tiny_recipe, tmp_path, "parts", *steps, nproc=2)
    assert "resuming after step 2" in out.stdout
    timing = {"tokens_per_s", "step_seconds", "peak_rss_mb"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "parts")) == strip(read_metrics(tmp_path / "whole"))
    a = load_file(tmp_path / "whole/final/adapter_model.safetensors")
    b = load_file(tmp_path / "parts/final/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different world size cannot continue a sharded checkpoint: said in one line, exit 2
    bad = run(tiny_recipe, tmp_path, "parts", *steps[:1], "distributed.strategy=fsdp2", "train.max_steps=6", check=False)
    assert bad.returncode == 2 and "written by 2 processes, resumed with 1" in bad.stderr


def torchrun(recipe, tmp_path, name, *extra, nproc=2):
    """The ranks of `tuneforge finetune --nproc-per-node N`, started by torchrun's command line as the launcher
    builds it (launch.torchrun_command), without the launcher's own pre-flight in a parent process."""
    args = SimpleNamespace(nproc_per_node=nproc, nnodes=1, rdzv_endpoint=None, node_rank=0, config=str(recipe),
                           overrides=tiny_overrides(tmp_path, name, *COMMON, *extra), overwrite=False, debug=False)
    return run_cli(command=torchrun_command(args), check=False)


def test_six_consecutive_two_process_runs_exit_cleanly(tiny_recipe, tmp_path):
    """How the ranks end (a clean exit, no SIGABRT from gloo's teardown), six times, DDP and FSDP2 in turn (every
    other slow test ends its own two-process runs the same way, about a dozen more); torchrun is started directly,
    as a user may, so the launcher's pre-flight (tested with the refusals) does not run every time."""
    for i in range(6):
        strategy = ("ddp", "fsdp2")[i % 2]
        proc = torchrun(tiny_recipe, tmp_path, f"r{i}", "train.max_steps=1", "data.train.limit=16",
                        "data.seq_length=96", f"distributed.strategy={strategy}")
        # the first lines hold the failing rank's own error, the last torchrun's summary
        assert proc.returncode == 0, (i, strategy, proc.stderr[:4000], proc.stderr[-1500:])
        assert "SIGABRT" not in proc.stderr and "Traceback" not in proc.stderr
