"""The bad-input matrix: every case is one row of docs/bad-input.md and one test (tests/e2e/test_bad_input.py).

Each case is a tuneforge command line; `{tmp}` is a scratch directory prepared by `setup`, `{repo}` the checkout.
Regenerate the page after changing cases: python -m tests.bad_input_cases > docs/bad-input.md"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO

FT = ["finetune", "-c", "{tmp}/recipe.yaml"]


@dataclass
class Case:
    area: str
    what: str
    argv: list[str]
    expect: str  # a part of the one-line message
    files: dict[str, str | bytes] = field(default_factory=dict)  # extra files to write under {tmp}
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int = 2


def bad_jsonl(rows: list[str]) -> str:
    return "\n".join(rows) + "\n"


STORIES_RUN = (f"model: {{name_or_path: {REPO}/assets/models/stories260K}}\n"  # a finished run's config.yaml
               f"data: {{train: {{path: {REPO}/assets/data/squad/train.json, format: squad}}}}\n")
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"


def safetensors_bytes(shapes: dict[str, tuple]) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()})


def lora_files(run: str, target: str, shapes: dict[str, tuple], trained_for: str) -> dict[str, str | bytes]:
    """A finished run whose final/ holds a LoRA adapter trained for another base model."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": [target],
              "base_model_name_or_path": trained_for}
    return {f"{run}/config.yaml": STORIES_RUN, f"{run}/final/adapter_config.json": json.dumps(config),
            f"{run}/final/adapter_model.safetensors": safetensors_bytes(shapes)}


# trained for a Llama of hidden size 32 (stories260K's is 64), and for GPT-2 (whose attention is one c_attn)
NARROW = lora_files("narrow", "q_proj", {f"{Q_PROJ_A}.weight": (4, 32), Q_PROJ_A[:-1] + "B.weight": (64, 4)},
                    "my/llama-32")
GPT2 = lora_files("gpt2", "c_attn", {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 64)},
                  "openai-community/gpt2")
OTHER_CKPT = safetensors_bytes({f"{Q_PROJ_A}.default.weight": (4, 32)})
T5 = {"t5/config.json": json.dumps({"model_type": "t5", "d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32,
                                   "vocab_size": 64})}  # an encoder-decoder: model.kind auto resolves to seq2seq
T5_FT = [*FT, "model.name_or_path={tmp}/t5"]
FULL_RUN = {"full/config.yaml": STORIES_RUN, "full/final/config.json": '{"model_type": "llama"}'}  # a full fine-tune
PAIR = '{"prompt": "Q: who? A:", "chosen": " Tom", "rejected": " Ann"}'
PREF = [*FT, "data.train.path={repo}/assets/data/squad_pairs/train.jsonl", "data.train.format=preference",
        "data.train.limit=16", "preference.loss_type=sigmoid", "data.seq_length=256"]

RL = [*FT, "rl.num_generations=4", "rl.max_completion_length=8", "rl.rewards=[{function: squad_f1}]"]
RL_FN = "rl.rewards=[{{function: 'tests.fixtures.rl_rewards:{}'}}]"  # the reward functions of tests/fixtures


CLS_FILES = {"cls.jsonl": bad_jsonl(['{"text": "a big dog", "label": "animal"}',
                                     '{"text": "a red apple", "label": "food"}']),
             "val.jsonl": bad_jsonl(['{"text": "a cat", "label": "animal"}', '{"text": "a tree", "label": "plant"}'])}
CLS_DATA = ["data.train.path={tmp}/cls.jsonl", "data.train.format=classification"]
CLS = ["model.kind=sequence_classification", *CLS_DATA]
SERVABLE = lora_files("done", "q_proj", {f"{Q_PROJ_A}.weight": (4, 64)}, "stories260K")  # a finished LoRA run


CASES = [
    # ---- recipe files ----
    Case("config", "recipe file missing", ["finetune", "-c", "{tmp}/nope.yaml"], "nope.yaml: no such recipe file"),
    Case("config", "recipe is not YAML", ["finetune", "-c", "{tmp}/bad.yaml"], "bad.yaml:3: invalid YAML",
         {"bad.yaml": "model:\n  name_or_path: [x\n  y: 1\n"}),
    Case("config", "recipe is a list, not a mapping", ["finetune", "-c", "{tmp}/list.yaml"],
         "a recipe must be a mapping of sections", {"list.yaml": "- a\n- b\n"}),
    Case("config", "misspelled section", [*FT, "trian.max_steps=3"], "trian: unknown key; did you mean train?"),
    Case("config", "misspelled key", [*FT, "data.seq_lenght=128"], "data.seq_lenght: unknown key; did you mean data.seq_length?"),
    Case("config", "text where a number is expected", [*FT, "train.micro_batch_size=eight"],
         "train.micro_batch_size: expected an integer, got 'eight'"),
    Case("config", "word where true/false is expected", [*FT, "data.train_on_inputs=maybe"],
         "data.train_on_inputs: expected true or false, got 'maybe'"),
    Case("config", "unknown choice", [*FT, "model.dtype=fp16"], "model.dtype: expected one of auto|float32|bfloat16, got 'fp16'"),
    Case("config", "scalar where a section is expected", [*FT, "train=5"], "train: expected a mapping of fields, got 5"),
    Case("config", "null for a required value", [*FT, "data.seq_length=null"], "data.seq_length: must not be null"),
    Case("config", "global batch not divisible", [*FT, "train.global_batch_size=12"],
         "train.global_batch_size (12) is not divisible by micro_batch_size (8)"),
    Case("config", "seq_length below 1", [*FT, "data.seq_length=0"], "data.seq_length: must be >= 1, got 0"),
    Case("config", "zero learning rate", [*FT, "train.optimizer.lr=0"], "train.optimizer.lr: must be > 0"),
    Case("config", "negative learning rate", [*FT, "train.optimizer.lr=-1e-4"], "train.optimizer.lr: must be > 0"),
    Case("config", "three Adam betas", [*FT, "train.optimizer.betas=[0.9,0.99,0.9]"], "train.optimizer.betas: expected two numbers"),
    Case("config", "zero gradient clip", [*FT, "train.grad_clip=0"], "train.grad_clip: must be > 0 or null"),
    Case("config", "zero micro batch", [*FT, "train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1"),
    Case("config", "zero max_steps", [*FT, "train.max_steps=0"], "train.max_steps: must be >= 1"),
    Case("config", "negative warmup", [*FT, "train.lr_scheduler.warmup_steps=-5"], "warmup_steps: must be >= 0"),
    Case("config", "checkpoint every 0 steps", [*FT, "checkpoint.every_steps=0"], "checkpoint.every_steps: must be >= 1 or null"),
    Case("config", "keep no checkpoint", [*FT, "checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1 or null"),
    Case("config", "LoRA rank 0", [*FT, "peft.lora_rank=0"], "peft.lora_rank: must be >= 1"),
    Case("config", "LoRA dropout 1", [*FT, "peft.lora_dropout=1.0"], "peft.lora_dropout: must be in [0, 1)"),
    Case("config", "resume from a missing checkpoint", [*FT, "checkpoint.resume={tmp}/ckpt"],
         "checkpoint.resume: expected auto, never or an existing checkpoint directory"),
    Case("config", "wandb asked for but not installed", [*FT, "logging.wandb.project=p"],
         "wandb is not installed: pip install 'tuneforge[wandb]'", env={"TUNEFORGE_TEST_HIDE": "wandb"}),
    # ---- command line ----
    Case("cli", "override without '='", [*FT, "train.max_steps"], "override 'train.max_steps': expected key.sub=value"),
    Case("cli", "unknown option", [*FT, "--fast"], "unrecognized arguments: --fast"),
    Case("cli", "finetune without -c", ["finetune"], "-c/--config FILE is required"),
    Case("cli", "several nodes without a rendezvous", [*FT, "--nnodes", "2", "train.global_batch_size=16"], "needs --rdzv-endpoint HOST:PORT"),
    Case("cli", "generate from a directory that is no run", ["generate", "--run", "{tmp}", "--prompt", "x"],
         "not a tuneforge run directory (no config.yaml)"),
    Case("cli", "generate from an unfinished run", ["generate", "--run", "{tmp}/unfinished", "--prompt", "x"],
         "the run has no final/ output yet", {"unfinished/config.yaml": "model: {name_or_path: x}\n"}),
    Case("cli", "generate zero tokens", ["generate", "--run", "{tmp}", "--prompt", "x", "--max-new-tokens", "0"],
         "--max-new-tokens: must be >= 1"),
    Case("cli", "slurm with zero nodes", ["slurm", "-c", "{tmp}/recipe.yaml", "--nodes", "0", "--gpus-per-node", "8"],
         "--nodes and --gpus-per-node must be >= 1"),
    # ---- model ----
    Case("model", "model directory missing", [*FT, "model.name_or_path=./no/such/model"],
         "model.name_or_path: no such model directory './no/such/model'"),
    Case("model", "directory without config.json", [*FT, "model.name_or_path={tmp}/empty_model"],
         "has no usable config.json", {"empty_model/README": "nothing"}),
    Case("model", "model without a causal-LM head", [*FT, "model.name_or_path={tmp}/t5", "model.kind=causal_lm"],
         "is a 't5' model without a causal-LM head", T5),
    Case("model", "seq2seq kind for a decoder-only model", [*FT, "model.kind=seq2seq"],
         "is a 'llama' model that AutoModelForSeq2SeqLM cannot load"),
    Case("model", "packing with a seq2seq model", [*T5_FT, "data.batching=packing"],
         "data.batching: packing applies to causal LMs", T5),
    Case("model", "loss on the prompt of a seq2seq model", [*T5_FT, "data.train_on_inputs=true"],
         "data.train_on_inputs: a seq2seq model reads the prompt in its encoder", T5),
    Case("model", "peft method without seq2seq support", [*T5_FT, "peft={method: llama_adapter}"],
         "peft.method: llama_adapter does not apply to seq2seq models", T5),
    Case("model", "top layers of a seq2seq model", [*T5_FT, "peft=null", "train.trainable.top_layers=1"],
         "train.trainable.top_layers: counts the layers of a decoder-only stack", T5),
    Case("model", "plain text for a seq2seq model", [*T5_FT, "data.train.path={tmp}/t.jsonl", "data.train.format=text"],
         "t.jsonl: format text has no prompt for a seq2seq model's encoder", {**T5, "t.jsonl": '{"text": "a b"}\n'}),
    Case("model", "vLLM export of a seq2seq run", ["export", "--run", "{tmp}/s2s", "--out", "{tmp}/e"],
         "holds an encoder-decoder (seq2seq) model, which vLLM does not serve",
         {"s2s/config.yaml": STORIES_RUN, "s2s/final/config.json": '{"is_encoder_decoder": true}'}),
    Case("export", "GGUF quant type the gguf package cannot write",
         ["export", "--run", "{tmp}/full", "--format", "gguf", "--quant", "q4_k_m", "--out", "{tmp}/m.gguf"],
         "--quant q4_k_m: gguf writes one of f32, f16, bf16, q8_0, q4_0", FULL_RUN),
    Case("export", "GGUF file that exists, without --overwrite",
         ["export", "--run", "{tmp}/full", "--format", "gguf", "--out", "{tmp}/old.gguf"],
         "old.gguf: exists; pass --overwrite to replace it", {**FULL_RUN, "old.gguf": "an earlier export"}),
    Case("export", "GGUF output not named .gguf", ["export", "--run", "{tmp}/full", "--format", "gguf", "--out",
                                                   "{tmp}/model"], "expected a file name ending in .gguf", FULL_RUN),
    Case("export", "GGUF of an architecture without an export",
         ["export", "--run", "{tmp}/gpt2full", "--format", "gguf", "--out", "{tmp}/m.gguf"],
         "model_type 'gpt2' has no GGUF export here (supported: llama, mistral, qwen2)",
         {"gpt2full/config.yaml": STORIES_RUN, "gpt2full/final/config.json": '{"model_type": "gpt2"}'}),
    Case("export", "GGUF LoRA of a full fine-tune",
         ["export", "--run", "{tmp}/full", "--format", "gguf-lora", "--out", "{tmp}/a.gguf"],
         "holds a full fine-tune, not one LoRA adapter; use --format gguf", FULL_RUN),
    Case("export", "an Ollama Modelfile for a GGUF LoRA",
         ["export", "--run", "{tmp}/full", "--format", "gguf-lora", "--ollama", "--out", "{tmp}/a.gguf"],
         "--ollama: goes with --format gguf", FULL_RUN),
    Case("model", "plan for a seq2seq model", ["plan", "-c", "{tmp}/recipe.yaml", "model.name_or_path={tmp}/t5"],
         "tuneforge plan covers causal LMs", T5),
    Case("model", "a checkpoint that ships its own code", [*FT, "model.name_or_path={tmp}/remote"],
         "ships its own model code, which tuneforge does not run unless asked; set model.trust_remote_code=true",
         {"remote/config.json": json.dumps({"model_type": "custom_thing", "architectures": ["CustomModel"],
                                            "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}),
          "remote/configuration_custom.py": "raise SystemExit('remote code ran')\n"}),
    Case("model", "an attention backend the architecture lacks",
         [*FT, "model.name_or_path={tmp}/gemma2", "model.attn_implementation=sdpa"],
         "model.attn_implementation: Gemma2ForCausalLM does not support 'sdpa'; it supports eager",
         {"gemma2/config.json": json.dumps({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})}),
    Case("model", "output directory under a file", [*FT, "run.output_dir={tmp}/afile/runs"],
         "run.output_dir: cannot write to", {"afile": "x"}),
    # ---- data ----
    Case("data", "training file missing", [*FT, "data.train.path={tmp}/missing.json"],
         "data.train.path: no such file"),
    Case("data", "malformed JSON line", [*FT, "data.train.path={tmp}/bad.jsonl", "data.train.format=input_output"],
         "bad.jsonl:2: invalid JSON", {"bad.jsonl": bad_jsonl(['{"input": "a", "output": "b"}', '{"input": "a" "output"}'])}),
    Case("data", "missing field", [*FT, "data.train.path={tmp}/nofield.jsonl", "data.train.format=input_output"],
         "nofield.jsonl:1: missing field 'output'", {"nofield.jsonl": bad_jsonl(['{"input": "a"}'])}),
    Case("data", "field of the wrong type", [*FT, "data.train.path={tmp}/type.jsonl", "data.train.format=input_output"],
         "type.jsonl:1: field 'output' must be str, got int", {"type.jsonl": bad_jsonl(['{"input": "a", "output": 3}'])}),
    Case("data", "bytes that are not UTF-8", [*FT, "data.train.path={tmp}/latin1.jsonl", "data.train.format=input_output"],
         "latin1.jsonl: not UTF-8 text", {"latin1.jsonl": b'{"input": "caf\xe9", "output": "x"}\n'}),
    Case("data", "template names a missing field", [*FT, "data.prompt_template={title}: {question}"],
         "prompt_template names field {title}"),
    Case("data", "SQuAD file without the data list", [*FT, "data.train.path={tmp}/notsquad.json"],
         "expected SQuAD json with a top-level 'data' list", {"notsquad.json": '{"version": "1.1"}'}),
    Case("data", "fewer examples than one micro-batch", [*FT, "data.train.limit=3"],
         "3 examples, fewer than micro_batch_size (8)"),
    Case("data", "unknown data format", [*FT, "data.train.format=csv"], "data.train.format: expected one of"),
    # ---- preference pairs ----
    Case("preference", "pair without a rejected completion", [*PREF, "data.train.path={tmp}/norej.jsonl"],
         "norej.jsonl:2: missing field 'rejected'", {"norej.jsonl": bad_jsonl([PAIR, '{"prompt": "Q:", "chosen": " a"}'])}),
    Case("preference", "empty chosen completion", [*PREF, "data.train.path={tmp}/empty.jsonl"],
         "empty.jsonl:1: field 'chosen' is empty",
         {"empty.jsonl": bad_jsonl(['{"prompt": "Q:", "chosen": " ", "rejected": " b"}', PAIR])}),
    Case("preference", "chosen identical to rejected", [*PREF, "data.train.path={tmp}/same.jsonl"],
         "same.jsonl:3: chosen and rejected are the same",
         {"same.jsonl": bad_jsonl([PAIR, PAIR, '{"prompt": "Q:", "chosen": " a", "rejected": " a"}'])}),
    Case("preference", "a prompt that alone fills seq_length", [*PREF, "data.train.path={tmp}/long.jsonl"],
         "long.jsonl:1: the prompt alone is",
         {"long.jsonl": bad_jsonl(['{"prompt": "' + "once upon a time " * 60 + '", "chosen": " a", "rejected": " b"}'])}),
    Case("preference", "preference data without a preference section", [*FT, "data.train.path={tmp}/p.jsonl",
         "data.train.format=preference"], "data.train.format: preference data trains with a preference section",
         {"p.jsonl": bad_jsonl([PAIR])}),
    Case("preference", "label_smoothing with the hinge loss", [*PREF, "preference.loss_type=hinge",
         "preference.label_smoothing=0.1"], "preference.label_smoothing: applies to loss_type sigmoid or robust"),
    Case("preference", "adapter-off reference for full fine-tuning", [*PREF, "peft=null",
         "preference.reference=adapter_off"], "preference.reference: adapter_off needs one adapter of lora, ia3"),
    # ---- online RL: the rl section, then reward functions (called as the first step or validation scores) ----
    Case("rl", "one completion per prompt", [*RL, "rl.num_generations=1"],
         "rl.num_generations: must be >= 2 (advantages compare the completions of one prompt), got 1"),
    Case("rl", "completions a step not a multiple of the group", [*RL, "rl.num_generations=3"],
         "train.global_batch_size (8) counts completions: it must be a multiple of rl.num_generations (3)"),
    Case("rl", "sampling at temperature 0", [*RL, "rl.temperature=0"], "rl.temperature: must be > 0 (sampling), got 0"),
    Case("rl", "unknown reward function", [*RL, "rl.rewards=[{function: bleu}]"],
         "rl.rewards[0].function: unknown reward 'bleu'; expected one of squad_f1, squad_em, exact_match, regex, length "
         "or an import path (module:function)"),
    Case("rl", "regex reward without a pattern", [*RL, "rl.rewards=[{function: regex}]"],
         "rl.rewards[0].pattern: reward regex needs it"),
    Case("rl", "rl and preference in one recipe", [*PREF, "rl.rewards=[{function: squad_f1}]"],
         "rl: a recipe has one objective; remove the preference section or rl"),
    Case("rl", "packing sampled completions", [*RL, "data.batching=packing"],
         "data.batching: rl batches its completions padded; use pad_longest"),
    Case("rl", "completions as long as seq_length", [*RL, "rl.max_completion_length=128"],
         "rl.max_completion_length (128) leaves no room for a prompt in data.seq_length (128); raise seq_length"),
    Case("rl", "prompts a step not divisible among processes",
         [*RL, "rl.num_generations=8", "train.micro_batch_size=4", "--nproc-per-node", "2"],
         "train.global_batch_size (8) / rl.num_generations (8) = 1 prompts a step, not divisible by the data-parallel "
         "size (2)"),
    Case("rl", "prompt data without an rl section", [*FT, "data.train.path={tmp}/p.jsonl", "data.train.format=prompt"],
         "data.train.format: prompt data (prompts without answers) trains with an rl section",
         {"p.jsonl": bad_jsonl(['{"prompt": "Once upon a time"}'])}),
    Case("rl", "reward module that cannot be imported", [*RL, "rl.rewards=[{function: 'my_rewards:score'}]"],
         "rl.rewards[0] (my_rewards:score): cannot import module 'my_rewards' (ModuleNotFoundError: No module named "
         "'tuneforge_no_such_package')", {"my_rewards.py": "import tuneforge_no_such_package\n"}),
    Case("rl", "reward returning the wrong count", [*RL, RL_FN.format("wrong_count")],
         "rl.rewards[0] (tests.fixtures.rl_rewards:wrong_count): returned 3 values for 2 completions"),
    Case("rl", "reward that raises", [*RL, RL_FN.format("raises")],
         "rl.rewards[0] (tests.fixtures.rl_rewards:raises): raised ValueError: reward server unreachable"),
    Case("rl", "reward returning text", [*RL, RL_FN.format("not_a_number")],
         "rl.rewards[0] (tests.fixtures.rl_rewards:not_a_number): value 0 is str ('high'); expected a float or None"),
    Case("rl", "reward reading a column the data lacks", [*RL, RL_FN.format("missing_column")],
         "rl.rewards[0] (tests.fixtures.rl_rewards:missing_column): reads column 'solution', which the data does not "
         "have (columns: answer, answers, context, id, question)"),
    # ---- runs and checkpoints ----
    Case("run", "finished run without --overwrite", [*FT, "run.name=done"],
         "already holds a run with nothing to resume; pass --overwrite", {"runs/done/final/x": "x"}),
    Case("run", "checkpoint whose file does not match its hash", [*FT, "checkpoint.resume={tmp}/ckpt_bad"],
         "ckpt_bad: trainable.safetensors does not match its hash", {"ckpt_bad/trainable.safetensors": b"corrupt",
          "ckpt_bad/manifest.json": json.dumps({"step": 2, "files": {"trainable.safetensors": {"size": 7, "sha256": "0" * 64}}})}),
    Case("run", "resume a checkpoint of another model", [*FT, "checkpoint.resume={tmp}/ckpt_other"],
         f"trainable.safetensors: written for another model or adapter: tensor {Q_PROJ_A}.default.weight has "
         "shape [4, 32], model",
         {"ckpt_other/trainable.safetensors": OTHER_CKPT, "ckpt_other/manifest.json": json.dumps(
             {"step": 2, "files": {"trainable.safetensors": {"size": len(OTHER_CKPT),
                                                             "sha256": hashlib.sha256(OTHER_CKPT).hexdigest()}}})}),
    # ---- adapters: checked against the base model's structure before its weights load ----
    Case("adapter", "generate with an adapter for another hidden size",
         ["generate", "--run", "{tmp}/narrow", "--prompt", "x"],
         f"narrow/final/adapter_model.safetensors: tensor {Q_PROJ_A}.weight has shape [4, 32], the base model", NARROW),
    Case("adapter", "eval with an adapter for another hidden size", ["eval", "--run", "{tmp}/narrow"],
         "(the adapter was trained for 'my/llama-32')", NARROW),
    Case("adapter", "merge an adapter for another hidden size", ["merge", "--run", "{tmp}/narrow", "--out", "{tmp}/m"],
         "narrow/final/adapter_model.safetensors: tensor", NARROW),
    Case("adapter", "export an adapter for another architecture", ["export", "--run", "{tmp}/gpt2", "--out", "{tmp}/e"],
         "gpt2/final/adapter_config.json: does not fit the base model", GPT2),
    Case("adapter", "generate with an adapter for other module names",
         ["generate", "--run", "{tmp}/gpt2", "--prompt", "x"],
         "Target modules {'c_attn'} not found in the base model", GPT2),
    # ---- sequence classification and init_from ----
    Case("classification", "classification data for a causal LM", [*FT, *CLS_DATA],
         "data format classification needs model.kind: sequence_classification", CLS_FILES),
    Case("classification", "packing one label per sequence", [*FT, *CLS, "data.batching=packing"],
         "data.batching: packing does not apply to sequence_classification", CLS_FILES),
    Case("classification", "validation label the training data lacks",
         [*FT, *CLS, "data.validation={path: {tmp}/val.jsonl, format: classification}"],
         "val.jsonl:2: label 'plant' is not one of the training labels (animal, food)", CLS_FILES),
    Case("classification", "head layers on a causal LM", [*FT, "model.head={hidden_layers: [64]}"],
         "model.head: applies to model.kind: sequence_classification only"),
    Case("config", "init_from a missing directory", [*FT, "model.init_from={tmp}/nope"],
         "model.init_from: expected a run, checkpoint or final/ directory"),
    # ---- serving ----
    Case("serve", "vLLM engine without vLLM", ["serve", "--run", "{tmp}/done", "--engine", "vllm"],
         "--engine vllm: vLLM is not installed: pip install vllm", SERVABLE, env={"TUNEFORGE_TEST_HIDE": "vllm"}),
    Case("serve", "serve without the serve extra", ["serve", "--run", "{tmp}/done", "--engine", "transformers"],
         "FastAPI and uvicorn are not installed: pip install 'tuneforge[serve]'", SERVABLE,
         env={"TUNEFORGE_TEST_HIDE": "fastapi"}),
    Case("serve", "zero concurrent requests", ["serve", "--run", "{tmp}/done", "--max-concurrent", "0"],
         "--max-concurrent: must be >= 1, got 0", SERVABLE),
    Case("serve", "port out of range", ["serve", "--run", "{tmp}/done", "--port", "70000"],
         "--port: must be in 0..65535, got 70000", SERVABLE),
    Case("serve", "chat template file missing",
         ["serve", "--run", "{tmp}/done", "--chat-template", "{tmp}/chat.jinja"],
         "chat.jinja: cannot read (FileNotFoundError); pass a Jinja file or the template itself", SERVABLE),
    Case("serve", "query an address without http://", ["query", "--url", "localhost:8000", "--prompt", "x"],
         "--url localhost:8000: expected http://HOST:PORT"),
    Case("serve", "query a server that is not there", ["query", "--url", "http://127.0.0.1:9", "--prompt", "x"],
         "--url http://127.0.0.1:9: cannot reach the server"),
    Case("serve", "query for zero tokens", ["query", "--url", "http://127.0.0.1:9", "--prompt", "x", "--max-tokens",
                                            "0"], "--max-tokens: must be >= 1, got 0"),
]


def recipe_text() -> str:
    """A valid tiny recipe that every case starts from (then breaks one thing)."""
    return (f"run: {{name: case, output_dir: '{{tmp}}/runs'}}\n"
            f"model: {{name_or_path: {REPO}/assets/models/stories260K, dtype: float32}}\n"
            f"peft: {{method: lora, lora_rank: 4, lora_alpha: 8}}\n"
            f"data: {{train: {{path: {REPO}/assets/data/squad/train.json, format: squad, limit: 16}}, seq_length: 128}}\n"
            "train: {micro_batch_size: 8, global_batch_size: 8, max_steps: 1}\n"
            "logging: {tensorboard: false, progress: false}\n")


def materialize(case: Case, tmp: Path) -> list[str]:
    (tmp / "recipe.yaml").write_text(recipe_text().replace("{tmp}", str(tmp)))
    for name, content in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return [a.replace("{tmp}", str(tmp)).replace("{repo}", str(REPO)) for a in case.argv]


def render() -> str:
    lines = ["# What tuneforge says about bad input", "",
             "Every row is checked by a test (`tests/e2e/test_bad_input.py`): the command exits with code 2 and prints",
             "one line, `tuneforge: error: ...`, containing the text shown, before any training work and without",
             "changing anything already written. Add `--debug` to see a traceback. `FT` stands for",
             "`tuneforge finetune -c recipe.yaml` with a valid recipe; `{tmp}` is a scratch directory.", "",
             "| # | area | input | what you see (part of the message) |", "|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        argv = " ".join(case.argv)
        argv = argv.replace("finetune -c {tmp}/recipe.yaml", "FT")
        cell = f"{case.what}: `tuneforge {argv}`".replace("|", "\\|")
        lines.append(f"| {i} | {case.area} | {cell} | `{case.expect.replace('|', chr(92) + '|')}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
