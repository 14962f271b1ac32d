"""Any recipe text or override gives a Config or a clean UserError, never an unhandled exception."""
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.config import load_config
from tuneforge.errors import UserError
from tests.conftest import SQUAD_TRAIN, STORIES

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
KEYS = ["run.name", "run.seed", "model.dtype", "peft", "peft.lora_rank", "peft.target_modules", "data.train",
        "data.train.limit", "data.seq_length", "train.micro_batch_size", "train.global_batch_size",
        "train.optimizer.lr", "train.optimizer.betas", "train.lr_scheduler.name", "checkpoint.resume",
        "logging.wandb", "distributed.strategy", "distributed.mixed_precision.param_dtype", "no.such.key"]
BASE = {"model": {"name_or_path": str(STORIES)}, "data": {"train": {"path": str(SQUAD_TRAIN)}}}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_overrides_never_crash(pairs):
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    try:
        load_config(BASE, overrides)
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_recipe_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except UserError as e:
        assert str(e).startswith(str(path))
