"""Task evaluation: SQuAD answers by batched greedy generation, validation loss / perplexity, and the `tuneforge
eval` entry point that scores a finished run (or its base model) and writes eval/."""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tuneforge.config.commands import EvalOptions
from tuneforge.config.rules.preference import reference_kind
from tuneforge.config.schema import Config, DataConfig, DataSource
from tuneforge.config.sources import is_hub_id, validation_sets
from tuneforge.data import build_eval_batches, load_records, prepare_source, source_name, template_for
from tuneforge.data.pairs import pair_eval_batches, prepare_pair_set
from tuneforge.data.prompts import prepare_prompt_set
from tuneforge.data.records import Record
from tuneforge.data.seq2seq import build_seq2seq_collator
from tuneforge.data.tokenize import chat_prompts_for, render_prompt
from tuneforge.data.truncate import fit_chat, fit_plain_prompt
from tuneforge.distributed import DistEnv, TrainModule, all_gather_objects, evaluating, forwards_in_lockstep, unwrap_ddp
from tuneforge.errors import UserError
from tuneforge.eval.classify import evaluate_classifier
from tuneforge.eval.generate import generate
from tuneforge.eval.harness import run_harness
from tuneforge.eval.preference import PreferenceStep, validate_pairs
from tuneforge.eval.rewards import held_out_rewards, load_rewards, reward_table, score
from tuneforge.eval.rollout import SamplingSettings, choose_sampling_mode, sample, stop_token_ids
from tuneforge.eval.squad import squad_scores
from tuneforge.eval.validate import validate
from tuneforge.models.classify import is_classifier
from tuneforge.models.layers import transformers_model
from tuneforge.models.load import resolve_precision
from tuneforge.run.model import load_run_model
from tuneforge.run.reference import REFERENCE_FILE
from tuneforge.run.scores import write_eval


def squad_source(cfg: Config, dataset: str | None = None, limit: int | None = None) -> DataSource | None:
    """The SQuAD questions to answer: --dataset, else eval.squad.path, else the first squad-format validation set.
    `limit` (None = the source's own limit, if any) caps the number of questions."""
    sq = cfg.eval.squad
    if dataset is not None:
        return DataSource(path=dataset, format="squad", limit=limit) if dataset_format(dataset) == "squad" else None
    if sq is not None and sq.path:
        return DataSource(path=sq.path, format="squad", limit=limit)
    for _, src in validation_sets(cfg.data):
        if src.format == "squad":
            return DataSource(path=src.path, format="squad", limit=limit if limit is not None else src.limit,
                              split=src.split)
    return None


def dataset_format(path: str) -> str:
    """--dataset FILE: a .jsonl file holds input/output lines, anything else is SQuAD json."""
    if not Path(path).is_file():
        raise UserError(f"--dataset: no such file '{path}'")
    return "input_output" if path.endswith(".jsonl") else "squad"


def prompt_budget(model, seq_length: int, max_new_tokens: int) -> int:
    """Prompt tokens that leave room for the answer within seq_length and the model's positions."""
    positions = getattr(transformers_model(model).config, "max_position_embeddings", None) or seq_length
    return max(8, min(seq_length, positions) - max_new_tokens)


def fit_prompt(record: Record, template: str, tokenizer, budget: int, source: str, chat=None) -> str:
    """The rendered prompt, shortened to `budget` tokens. The context is cut from its end without looking at the
    gold answer (which training may use to place its window, but an honest evaluation may not). With `chat`
    (data.prompt_style chat) the prompt is the user turn of the chat template, ready for the assistant's answer."""
    def render(r: Record) -> str:
        return render_prompt(template, r, source)

    if chat is not None:  # cutting the turn markers would only garble it: a prompt over budget stays whole
        return fit_chat(record, render, chat, tokenizer, budget, use_answer=False)[1]
    return fit_plain_prompt(record, render, tokenizer, budget)


@dataclass
class SquadTask:
    """SQuAD questions with their prompts, built once and answered as often as asked (e.g. every N steps)."""
    records: list[Record]
    prompts: list[str]
    max_new_tokens: int
    batch_size: int
    add_special_tokens: bool = True  # False for chat-template prompts, which write bos themselves

    def answer(self, model, tokenizer, precision, rank: int = 0, world_size: int = 1,
               lockstep: bool = False) -> dict[str, str]:
        """{question_id: answer}: greedy, stopping at a newline or eos. Runs under a forked RNG and in eval mode,
        so answering mid-training changes neither the training numerics nor the random stream. With several
        ranks, rank r answers batches r, r + world_size, ...: the very batches one process would form, so the
        gathered answers are one process's answers. `lockstep` (FSDP2, where every forward is a collective) gives
        every rank as many generate calls, a short share padded with the first question, whose answers are
        dropped, and keeps each call stepping until every rank's batch is done."""
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        mine = self.batches(rank, world_size)
        padding = [range(1)] * (len(self.batches(0, world_size)) - len(mine)) if lockstep else []  # rank 0 has most
        with torch.random.fork_rng(devices=devices):
            answers = [generate(model, tokenizer, [self.prompts[i] for i in batch], self.max_new_tokens,
                                self.batch_size, precision, stop_at_newline=True,
                                add_special_tokens=self.add_special_tokens, synced_gpus=lockstep)
                       for batch in mine + padding]
        model.train(was_training)
        return {self.records[i].id: a for batch, texts in zip(mine, answers) for i, a in zip(batch, texts)}

    def batches(self, rank: int, world_size: int) -> list[range]:
        """Rank `rank`'s question batches: every world_size-th of one process's batches, from the rank-th."""
        starts = range(rank * self.batch_size, len(self.prompts), world_size * self.batch_size)
        return [range(start, min(start + self.batch_size, len(self.prompts))) for start in starts]

    def references(self) -> dict[str, list[str]]:
        return {r.id: r.references for r in self.records}

    def score(self, model, tokenizer, precision) -> tuple[dict[str, float], dict[str, str]]:
        predictions = self.answer(model, tokenizer, precision)
        return squad_scores(predictions, self.references()), predictions


class SquadDuringTraining:
    """eval.squad inside the training loop: at step 0, every `every_steps` and at the last step."""

    def __init__(self, task: SquadTask, every_steps: int | None, tokenizer, precision, env=None):
        self.task, self.every, self.tokenizer, self.precision, self.env = task, every_steps, tokenizer, precision, env

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every is not None and step % self.every == 0)

    def at(self, step: int, total_steps: int, module) -> dict[str, float]:
        """The scores at this step (empty when none are due), from the training loop's wrapped module. Every rank
        answers its share of the questions (under FSDP2 in lockstep, with the root's weights gathered by
        TrainModule.generate) and all ranks gather every answer before scoring."""
        if not self.due(step, total_steps):
            return {}
        env = self.env
        rank, world = (env.rank, env.world_size) if env is not None and env.initialized else (0, 1)
        lockstep = env is not None and forwards_in_lockstep(module, env)
        with evaluating(module):  # FSDP2: generating leaves the root's weights gathered; this reshards them
            share = self.task.answer(unwrap_ddp(module), self.tokenizer, self.precision, rank, world, lockstep)
        predictions = {}
        for answers in all_gather_objects(share, env):
            predictions.update(answers)
        return squad_scores(predictions, self.task.references())


def build_training_squad(cfg: Config, tokenizer, model, precision, env=None) -> SquadDuringTraining | None:
    if cfg.eval.squad is None:
        return None
    source = squad_source(cfg, limit=cfg.eval.squad.limit)
    if source is None:
        raise UserError("eval.squad: needs eval.squad.path (a SQuAD json) or a squad-format data.validation set")
    task = build_squad_task(cfg, source, tokenizer, model)
    return SquadDuringTraining(task, cfg.eval.squad.every_steps, tokenizer, precision, env)


def build_squad_task(cfg: Config, source: DataSource, tokenizer, model, batch_size: int | None = None) -> SquadTask:
    sq = cfg.eval.squad
    max_new_tokens = sq.max_new_tokens if sq else 32
    batch_size = batch_size or (sq.batch_size if sq else 16)
    records = load_records(source.path, "squad", source.limit, split=source.split)
    template = template_for(cfg.data, source)
    budget = prompt_budget(model, cfg.data.seq_length, max_new_tokens)
    chat = chat_prompts_for(cfg.data, tokenizer, source.path)
    prompts = [fit_prompt(r, template, tokenizer, budget, source.path, chat) for r in records]
    return SquadTask(records, prompts, max_new_tokens, batch_size, add_special_tokens=chat is None)


@torch.no_grad()
def loss_on(model, batches, precision) -> dict[str, float]:
    # the training loop's own validation: the same loss code, on this process's device
    scores = validate(TrainModule(model), batches, precision, DistEnv(device=str(model.device)))
    model.eval()  # validate() hands the model back in training mode
    return {"val_loss": scores["val_loss"], "perplexity": scores["val_perplexity"]}


def evaluate_loss(model, tokenizer, data: DataConfig, sources: list[tuple[str, DataSource]], precision,
                  batch_size: int) -> dict[str, float]:
    """val_loss / perplexity of the first set; with several sets, each one also as val_loss/<name>."""
    results: dict[str, float] = {}
    for i, (name, source) in enumerate(sources):
        prepared = prepare_source(data, source, tokenizer)
        batches = build_eval_batches(prepared.examples, batch_size, tokenizer.pad_token_id,
                                     collate_fn=build_seq2seq_collator(model.config, tokenizer))
        scores = loss_on(model, batches, precision)
        if i == 0:
            results.update(scores)
        if len(sources) > 1:
            results.update({f"{k}/{name}": v for k, v in scores.items()})
    return results


def evaluate_pairs(model, tokenizer, cfg: Config, sources: list[tuple[str, DataSource]], precision,
                   run_dir: Path, batch_size: int) -> dict[str, float]:
    """The held-out preference metrics (val_loss, val_rewards/*, val_logps/*) of each set, with the run's reference:
    the adapter switched off, or the log-probs stored with the run for its recorded validation sets."""
    kind = reference_kind(cfg, "single")
    tables = load_file(str(run_dir / REFERENCE_FILE)) if kind == "precomputed" else {}
    batches = {}
    for name, source in sources:
        pairs = prepare_pair_set(cfg.data, cfg.preference, [source], tokenizer).examples
        table = tables.get(f"val/{name}")
        if kind == "precomputed" and (table is None or len(table) < len(pairs)):
            raise UserError(f"{source.path}: this run's reference log-probs ({run_dir / REFERENCE_FILE}) cover "
                            "its recorded validation sets only; evaluate those (no --dataset)")
        batches[name] = pair_eval_batches(pairs, batch_size, tokenizer.pad_token_id, 0, 1,
                                          "pad_longest", cfg.data.seq_length)
    module = TrainModule(model)
    scores = validate_pairs(module, batches, precision, DistEnv(device=str(model.device)),
                            PreferenceStep(cfg.preference, kind, tables))
    model.eval()
    return scores


@torch.no_grad()
def evaluate_rewards(model, tokenizer, cfg: Config, sources: list[tuple[str, DataSource]], precision,
                     batch_size: int) -> dict:
    """An RL run's held-out prompts: one greedy completion each (sampled as training samples this model), scored by
    the run's rewards: val_reward and val_rewards/<name>/mean, as validation during training logs them."""
    rewards, stops = load_rewards(cfg.rl.rewards), stop_token_ids(tokenizer, model)
    model.eval()
    mode, _, _ = choose_sampling_mode(model, model.get_input_embeddings().num_embeddings, tokenizer.pad_token_id,
                                      model.device, resolve_precision("float32", model.device.type))
    settings = SamplingSettings(cfg.rl.max_completion_length, greedy=True)
    per_set = {}
    for name, source in sources:
        prompts = prepare_prompt_set(cfg.data, cfg.rl, [source], tokenizer).examples
        values = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            got = sample(model.forward, [p.ids for p in chunk], [0] * len(chunk), settings, tokenizer.pad_token_id,
                         stops, model.device, precision, mode=mode)
            texts = [tokenizer.decode([t for t in c if t not in stops], skip_special_tokens=True)
                     for c in got.completions]
            values.append(reward_table(rewards, score(rewards, [p.shown for p in chunk], texts, got.completions,
                                                      [p.columns for p in chunk])))
        per_set[name] = torch.cat(values)
    return held_out_rewards(rewards, per_set)


def _limited(source: DataSource, limit: int | None) -> DataSource:
    return dataclasses.replace(source, limit=limit if limit is not None else source.limit)


def evaluate_run(opts: EvalOptions) -> dict:
    """`tuneforge eval`: with --harness the lm-eval tasks (eval/harness.json); else loss / perplexity on the run's
    validation sets (or --dataset) and SQuAD EM/F1 where there are SQuAD questions, written to
    eval/squad_predictions.json and eval/scores.json (eval/base/ for the base model)."""
    run_dir, base, limit, dataset = opts.run, opts.base, opts.limit, opts.dataset
    if opts.harness is not None:
        harness_args = opts.harness_args
        if opts.batch_size is not None:  # a batch_size= of --harness-args comes later and wins
            harness_args = [f"batch_size={opts.batch_size}", *harness_args]
        return {"model": "base" if base else "final",
                "harness": run_harness(run_dir, opts.harness, harness_args, base=base, limit=limit)}
    model, tokenizer, cfg = load_run_model(run_dir, base=base, overrides=opts.overrides)
    precision = resolve_precision(cfg.model.dtype, model.device.type)
    batch_size = opts.batch_size or cfg.train.micro_batch_size
    if dataset is not None:
        fmt = ("classification" if is_classifier(model) else "preference" if cfg.preference is not None
               else dataset_format(dataset))
        given = DataSource(path=dataset, format=fmt, limit=limit)
        sources = [(source_name(given), given)]
    else:
        sources = [(name, _limited(src, limit)) for name, src in validation_sets(cfg.data)]
    for _, src in sources:
        if not (Path(src.path).exists() or is_hub_id(src.path)):
            raise UserError(f"{src.path}: no such validation file (recorded in {run_dir}/config.yaml)")
    results: dict = {"model": "base" if base else "final"}
    if is_classifier(model):  # loss, accuracy and macro-F1 with the labels the model was trained on
        results.update(evaluate_classifier(model, tokenizer, cfg.data, sources, precision, batch_size))
    elif cfg.preference is not None:  # held-out pairs: the preference loss and TRL's rewards/* against the reference
        results.update(evaluate_pairs(model, tokenizer, cfg, sources, precision, Path(run_dir), batch_size))
    elif cfg.rl is not None:  # held-out prompts: the greedy reward, as training scores them
        results.update(evaluate_rewards(model, tokenizer, cfg, sources, precision, batch_size))
    else:
        results.update(evaluate_loss(model, tokenizer, cfg.data, sources, precision, batch_size))
    squad = None if is_classifier(model) else squad_source(cfg, dataset, limit)
    predictions = None
    if squad is not None:
        if not (Path(squad.path).exists() or is_hub_id(squad.path)):
            raise UserError(f"{squad.path}: no such SQuAD file")
        task = build_squad_task(cfg, squad, tokenizer, model, opts.batch_size)
        scores, predictions = task.score(model, tokenizer, precision)
        results.update(scores, squad_questions=len(task.records), squad_prompt=cfg.data.prompt_style)
    if len(results) == 1:
        raise UserError(f"--run {run_dir}: nothing to evaluate (no validation set or SQuAD questions); "
                        "pass --dataset FILE or --harness TASKS")
    write_eval(Path(run_dir), results, predictions, base)
    return results
