"""The training objective: what a recipe trains its model to do, as one object the recipe calls without asking which.

An objective brings its data (records to examples or pairs), its batches (the collator, the tokens a packed row holds,
the held-out batches), the first lines it logs about them, what it sets up before the first step (a preference run's
reference), its step (forward and backward over the step's micro-batches, divided by what the step counts: label
tokens, pairs), its held-out metrics, and the name of what it counts. The recipe (train/recipe.py) reads setup ->
train_step -> train -> finish the same way for every objective; a new objective is one class here or in a module of
its own, subclassing Objective, and one entry in the recipe's OBJECTIVES.

  sft         supervised fine-tuning: causal LM, seq2seq and classifier batches alike (models/loss.py picks the loss)
  preference  DPO and its family on pairs (train/preference.py), chosen by the recipe's preference section
  rl          online RL with verifiable rewards, GRPO and its loss family (train/grpo.py), chosen by the rl section"""
from __future__ import annotations

from tuneforge.config import Config
from tuneforge.data import build_eval_batches, count_input_tokens, prepare_data
from tuneforge.data.seq2seq import build_seq2seq_collator
from tuneforge.data.summary import data_summary_lines
from tuneforge.distributed import DistEnv, all_reduce_sum, set_gradient_sync
from tuneforge.eval.validate import validate
from tuneforge.models.loss import count_label_tokens


class Objective:
    """The interface, with supervised fine-tuning as its implementation: a step's loss is its summed token losses
    over all micro-batches and ranks divided by the label tokens of the whole step. Another objective overrides what
    differs (train/preference.py)."""
    name = "sft"
    counts = "label_tokens"  # what a step's loss is divided by, as its metrics name it
    has_state = False  # whether a checkpoint saves the objective's own state (state_dict / load_state_dict)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare_data(self, tokenizer):
        return prepare_data(self.cfg.data, tokenizer, self.cfg.run.seed, progress=self.cfg.logging.progress)

    def collator(self, tokenizer, model_config):
        """The batches' collator, None for the loader's own (seq2seq models bring theirs)."""
        data = self.cfg.data
        return build_seq2seq_collator(model_config, tokenizer, data.batching, data.seq_length)

    def row_tokens(self, train_data) -> int:
        """Tokens of a packed row (or the longest padded one)."""
        return self.cfg.data.seq_length

    def loader_batch_size(self, world_size: int) -> int:
        """Items per batch the training loader yields on a process (SFT: a micro-batch of examples)."""
        return self.cfg.train.micro_batch_size

    def steps_per_epoch(self, per_rank: int, accum: int) -> float:
        """Optimizer steps per pass over the training data, from the loader's batches per process."""
        return per_rank / accum

    def draw(self, batches, accum: int, step: int) -> list:
        """What optimizer step `step` + 1 takes from the loader: its micro-batches."""
        return [next(batches) for _ in range(accum)]

    def input_tokens(self, draws: list, env: DistEnv) -> int:
        """Real (non-padding) tokens the step read, over all processes: throughput."""
        return int(all_reduce_sum(sum(count_input_tokens(mb) for mb in draws), env))

    def prepare_model(self, model, strategy: str, env: DistEnv) -> list[str]:
        """Anything taken from (or checked on) the starting model before it is wrapped and a checkpoint resumed;
        returns lines for the log. Nothing for SFT."""
        return []

    def eval_batches(self, vals: dict, tokenizer, env: DistEnv, collate) -> dict:
        t, data = self.cfg.train, self.cfg.data
        return {name: build_eval_batches(val.examples, t.micro_batch_size, tokenizer.pad_token_id, env.rank,
                                         env.world_size, data.batching, data.seq_length, collate_fn=collate)
                for name, val in vals.items()}

    def summary_lines(self, train_data, vals: dict, sampler) -> list[str]:
        return data_summary_lines(train_data, vals, sampler, self.cfg.data)

    def start(self, training, train_data, vals: dict) -> None:
        """What the objective needs before the first step, once the run directory exists: nothing for SFT."""

    def step(self, module, micro_batches: list[dict], precision, env: DistEnv) -> tuple[float, int, dict]:
        """(mean loss, what it was divided by, metrics) of one step's forward and backward."""
        loss, tokens = accumulate_gradients(module, micro_batches, precision, env)
        return loss, tokens, {}

    def validate(self, module, val_batches: dict, precision, env: DistEnv) -> dict:
        return validate(module, val_batches, precision, env)


def accumulate_gradients(module, micro_batches: list[dict], precision, env: DistEnv) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches; returns (mean loss per label token, label tokens), both
    over all ranks. Each micro-batch's summed loss is divided by the label tokens of the WHOLE step (all its
    micro-batches, all ranks), not by its own: the gradients then add up to the gradient of one big batch,
    whatever the split. DDP and FSDP average gradients over ranks, so each rank's share is scaled back up by the
    world size."""
    step_tokens = all_reduce_sum(sum(count_label_tokens(mb) for mb in micro_batches), env)
    scale = env.world_size / max(step_tokens, 1)
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        with set_gradient_sync(module, i == len(micro_batches) - 1):  # all-reduce once, on the last micro-batch
            with precision.context():
                loss = module({k: v.to(env.device) for k, v in mb.items()})  # summed over its label tokens
            (loss * scale).backward()
        loss_sum += loss.detach()
    return all_reduce_sum(float(loss_sum), env) / max(step_tokens, 1), int(step_tokens)
