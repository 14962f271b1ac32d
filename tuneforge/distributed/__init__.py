"""torch.distributed plumbing: process group, device mesh, DDP and FSDP2 wrapping, collectives the loop needs.

One process needs none of it; torchrun (launched by `tuneforge finetune --nproc-per-node N` or by the user) sets
RANK / WORLD_SIZE / LOCAL_RANK and the same recipe runs data-parallel, gloo on CPU and nccl on CUDA. Which strategy a
recipe runs with, and what each strategy refuses, are recipe rules (config/rules/distributed.py)."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from tuneforge.config.rules.distributed import check_dp_replicate
from tuneforge.config.schema import DistributedConfig
from tuneforge.models.layers import decoder_layers
from tuneforge.models.loss import training_loss

log = logging.getLogger("tuneforge")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized: bool = False
    mesh: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(strategy: str) -> DistEnv:
    """Join the process group torchrun prepared (or a one-rank group, for fsdp2 on one device)."""
    world = launched_world_size()
    if world == 1 and strategy != "fsdp2":
        return DistEnv(device=local_device())
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        if world == 1:  # fsdp2 on a single device still needs a (trivial) process group
            store = tempfile.NamedTemporaryFile(prefix="tuneforge-pg-", delete=False).name
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return DistEnv(rank, world, local_rank, device, True)


def build_mesh(env: DistEnv, dp_replicate: int):
    """1-D mesh (shard) for FSDP, or 2-D (replicate, shard) for HSDP: replicas across nodes, shards within."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if env.device.startswith("cuda") else "cpu"
    if dp_replicate > 1:
        check_dp_replicate(dp_replicate, env.world_size)
        return init_device_mesh(kind, (dp_replicate, env.world_size // dp_replicate),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (env.world_size,), mesh_dim_names=("shard",))


class TrainModule(nn.Module):
    """The model plus tuneforge's loss in one forward, so the DDP / FSDP hooks run around exactly what trains
    (the loss calls the backbone and the LM head directly, on labelled positions only). Which loss a batch gets is
    models.loss.training_loss's decision."""

    def __init__(self, model: nn.Module, loss_chunk_tokens: int = 1024, head_on_labels_only: bool = True):
        super().__init__()
        self.model = model
        self.loss_chunk_tokens, self.full_forward = loss_chunk_tokens, not head_on_labels_only

    def forward(self, batch: dict[str, torch.Tensor], with_logits: bool = False):
        return training_loss(self.model, batch, full_forward=self.full_forward, chunk_tokens=self.loss_chunk_tokens,
                             with_logits=with_logits)

    def decode(self, **kwargs):
        """The model's own forward (online RL's sampler: eval/rollout.py), registered under FSDP2 like generate."""
        return self.model(**kwargs)

    def generate(self, **kwargs):
        """The model's generate. Under FSDP2 apply_fsdp registers it as a forward of the root unit, which holds the
        embeddings, final norm and LM head: called on the inner model, those would stay sharded (DTensors), since
        only the decoder layers' own units gather around their forwards."""
        return self.model.generate(**kwargs)


def apply_fsdp(module: TrainModule, cfg: DistributedConfig, env: DistEnv, param_dtype, reduce_dtype) -> nn.Module:
    """FSDP2: fully_shard each decoder layer, then the root (embeddings, final norm, LM head). Frozen base weights
    and trainable LoRA weights of a layer live in the same unit, so each layer is one all-gather."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    env.mesh = build_mesh(env, cfg.dp_replicate)
    common = dict(mesh=env.mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                  # pinned host memory speeds up GPU<->CPU copies; without a GPU there is nothing to pin for
                  offload_policy=(CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload
                                  else OffloadPolicy()))
    for layer in decoder_layers(module.model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **common)
    fully_shard(module, reshard_after_forward=False, **common)  # the root is needed again at once by backward
    register_fsdp_forward_method(module, "generate")  # eval.squad: the root gathers its weights around generate
    register_fsdp_forward_method(module, "decode")  # online RL's sampler, likewise
    return module


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """Eval mode for forwards with no backward (validation, eval.squad's generation), then training mode with every
    FSDP2 unit resharded.
    The root is sharded with reshard_after_forward=False, so a forward leaves its weights gathered for a backward
    that never comes: the module then lists those plain, whole tensors instead of its DTensor shards, and anything
    that collects parameters before the next backward (the gradient-clipping list) misses their gradients."""
    from torch.distributed.fsdp import FSDPModule

    module.eval()
    try:
        yield
    finally:
        module.train()
        for unit in module.modules():
            if isinstance(unit, FSDPModule):  # the next forward gathers the root again: one all-gather per validation
                unit.reshard()


def scatter_from_rank0(module: nn.Module, full_state: dict | None, env: DistEnv) -> None:
    """Give every rank its shards of rank 0's weights. The other ranks built the model on the meta device, so
    they allocate only their shards here; buffers (e.g. rotary frequencies) are not sharded and are copied whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not env.is_main:
        module.to_empty(device=env.device)
    set_model_state_dict(module, full_state if env.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def needs_skeleton(strategy: str, env: DistEnv) -> bool:
    """FSDP2 on several ranks: only rank 0 loads weights; the others start from the meta-device skeleton."""
    return strategy == "fsdp2" and env.world_size > 1 and not env.is_main


def apply_ddp(module: TrainModule, env: DistEnv) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.local_rank] if env.device.startswith("cuda") else None
    return DistributedDataParallel(module.to(env.device), device_ids=device_ids)


def wrap_model(model: nn.Module, strategy: str, cfg: DistributedConfig, env: DistEnv, compute_dtype,
               loss_chunk_tokens: int = 1024, head_on_labels_only: bool = True) -> nn.Module:
    module = TrainModule(model, loss_chunk_tokens, head_on_labels_only)
    if strategy == "ddp":
        return apply_ddp(module, env)
    if strategy == "fsdp2":
        mp = cfg.mixed_precision
        param_dtype = _dtype(mp.param_dtype) if mp.param_dtype else compute_dtype
        reduce_dtype = _dtype(mp.reduce_dtype) if mp.reduce_dtype else torch.float32
        full = module.state_dict() if env.is_main else None  # rank 0's real weights, to be scattered
        apply_fsdp(module, cfg, env, param_dtype, reduce_dtype)
        if env.world_size > 1:
            scatter_from_rank0(module, full, env)
        return module
    return module.to(env.device)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def set_gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (accumulate locally)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(module, "no_sync") and not enabled:  # DDP
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: float | int, env: DistEnv) -> float:
    if not env.initialized or env.world_size == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item()


def all_reduce_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum over ranks of a CPU tensor (a new tensor; the input on one process)."""
    if not env.initialized or env.world_size == 1:
        return t
    out = t.to(env.device, copy=True)
    dist.all_reduce(out)
    return out.cpu()


def inner_model(module: nn.Module) -> nn.Module:
    """The user's model inside the DDP / FSDP / TrainModule wrappers."""
    module = unwrap_ddp(module)
    return module.model if isinstance(module, TrainModule) else module


def unwrap_ddp(module: nn.Module) -> nn.Module:
    """The TrainModule inside DDP (generating needs no gradient sync); any other module as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def forwards_in_lockstep(module: nn.Module, env: DistEnv) -> bool:
    """FSDP2 on several ranks: every forward all-gathers weight shards, so every rank must run as many forwards
    as the others (a rank that stops early leaves the others waiting in an all-gather)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap_ddp(module), FSDPModule) and env.initialized and env.world_size > 1


def barrier(env: DistEnv) -> None:
    if env.initialized and env.world_size > 1:
        dist.barrier()


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.initialized or env.world_size == 1:
        return [obj]
    box = [None] * env.world_size
    dist.all_gather_object(box, obj)
    return box


def broadcast_object(obj, env: DistEnv):
    if not env.initialized or env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(env: DistEnv) -> None:
    """Leave the process group cleanly (callers drop their DDP module first: gloo aborts at exit otherwise)."""
    if env.initialized and dist.is_initialized():
        barrier(env)
        dist.destroy_process_group()


def detect_env() -> DistEnv:
    """The environment of a single-process command (generate, eval)."""
    return DistEnv(device=local_device())
