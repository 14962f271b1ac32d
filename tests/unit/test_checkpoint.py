import pytest
import torch
from torch import nn

from tuneforge.checkpoint import LATEST, find_latest, load_checkpoint, save_checkpoint
from tuneforge.checkpoint.state import TrainState
from tuneforge.config.schema import SchedulerConfig
from tuneforge.data.loader import MicroBatchSampler
from tuneforge.errors import UserError
from tuneforge.train.optim import build_scheduler


class Loader:
    def __init__(self):
        self.sampler = MicroBatchSampler(40, 4, seed=0)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, s):
        self.sampler.load_state_dict(s)


def parts(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = build_scheduler(opt, SchedulerConfig(name="cosine", warmup_steps=2), 10)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched, Loader()


def test_round_trip_restores_weights_optimizer_schedule_rng_and_data_position(tmp_path):
    model, opt, sched, loader = parts(0)
    loader.sampler.taken = 5
    save_checkpoint(tmp_path, TrainState(model, opt, sched, loader, 7), {}, keep_last=None)
    expected_rand = torch.rand(3)
    m2, o2, s2, l2 = parts(1)
    state = TrainState(m2, o2, s2, l2)
    load_checkpoint(find_latest(tmp_path), state)
    assert state.step == 7 and l2.sampler.taken == 5
    assert torch.equal(m2[1].weight, model[1].weight)
    assert not torch.equal(m2[0].weight, model[0].weight)  # frozen weights are not part of the checkpoint
    assert s2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_rand)


def test_retention_and_latest_pointer(tmp_path):
    model, opt, sched, loader = parts(0)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, TrainState(model, opt, sched, loader, step), {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_3", "step_4"]
    assert (tmp_path / LATEST).read_text() == "step_4"
    assert not list(tmp_path.glob(".tmp-*"))


def test_damaged_newest_falls_back_to_previous(tmp_path, caplog):
    model, opt, sched, loader = parts(0)
    for step in (1, 2):
        save_checkpoint(tmp_path, TrainState(model, opt, sched, loader, step), {}, keep_last=None)
    with open(tmp_path / "step_2" / "trainable.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert find_latest(tmp_path).name == "step_1"
    assert "damaged" in caplog.text
    # a half-written temporary directory is never picked
    (tmp_path / ".tmp-step_3-1").mkdir()
    assert find_latest(tmp_path).name == "step_1"


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    model, opt, sched, loader = parts(0)
    save_checkpoint(tmp_path, TrainState(model, opt, sched, loader, 1), {}, keep_last=None)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    no_bias = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, bias=False))
    for model, expect in ((other, r"tensor 1.bias has shape \[2\], this model needs \[3\]"),
                          (no_bias, r"it has tensor 1.bias, for which this model has no place")):
        with pytest.raises(UserError, match=expect):
            load_checkpoint(find_latest(tmp_path), TrainState(model, *parts(1)[1:]))
