"""train.compile: torch.compile of each decoder layer (LoRA's in-place forward takes its compile branch there) trains
the losses eager training gives, within fp32 rounding. In-process, one worker of the suite: inductor compiles the layer
graph with g++ first (most of the test's time)."""
import pytest

from tests.conftest import tiny_overrides, train_losses
from tuneforge.api import finetune


def test_compiled_layers_train_the_eager_losses(tmp_path, tiny_recipe):
    common = ["train.max_steps=3", "data.train.limit=24", "train.log_every_steps=1"]
    eager = finetune(tiny_recipe, tiny_overrides(tmp_path, "eager", *common, "train.compile=false"))
    compiled = finetune(tiny_recipe, tiny_overrides(tmp_path, "compiled", *common, "train.compile=true"))
    want, got = train_losses(eager), train_losses(compiled)
    assert len(want) == len(got) == 3
    assert got == pytest.approx(want, rel=1e-5)
    assert got[0] != got[-1]  # it trained
