"""Starting many processes: torchrun on this machine, or an sbatch script for Slurm clusters."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tuneforge.config.schema import RunConfig
from tuneforge.errors import UserError


def torchrun_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}"]
    if args.nnodes == 1 and not args.rdzv_endpoint:
        cmd.append("--standalone")  # a private rendezvous on a free local port
    else:
        if not args.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the address of node 0)")
        cmd += [f"--node-rank={args.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
    cmd += ["-m", "tuneforge", "finetune", "-c", args.config, *args.overrides]
    if args.overwrite:
        cmd.append("--overwrite")
    if args.debug:
        cmd.append("--debug")
    return cmd


def launch_torchrun(args) -> int:
    """Check the recipe here, once, then re-run this command under torchrun; torchrun's exit status is ours."""
    command = torchrun_command(args)
    check_before_launch(args)
    return subprocess.call(command)


def check_before_launch(args) -> None:
    """Every recipe rule and the pre-flight, for the process count torchrun will start: a refused recipe is then
    one line from this process (the message a one-process run prints), not one per rank and torchrun's traceback."""
    from tuneforge.config import load_config
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.preflight import preflight

    world = args.nproc_per_node * args.nnodes
    cfg = load_config(args.config, args.overrides, world_size=world)
    cfg = resolve_model_source(cfg)  # a GGUF base is converted once here, not by every rank at once
    preflight(cfg, world, warn=False)


SLURM_TEMPLATE = """#!/usr/bin/env bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --output={run_dir}/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
{extra}
# tuneforge multi-node job: one torchrun per node, {gpus} training processes each, rendezvous on the first node.
# Preemption or the time limit sends USR1 to this script 180 s ahead: it asks every training process to checkpoint
# at its next step boundary and exit, then requeues the job, which resumes from that checkpoint (resume: auto).
set -euo pipefail
cd {workdir}

# sed reads the whole list: `head` would close the pipe early and pipefail would turn that SIGPIPE into a failure
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
rdzv_port=${{TUNEFORGE_RDZV_PORT:-29500}}
preempted=0

on_preempt() {{
  preempted=1
  # The training processes (not torchrun, which would tear them down) get the signal, on every node.
  srun --overlap --ntasks-per-node=1 pkill -USR1 -f "^[^ ]*python[^ ]* -u -m tuneforge finetune" || true
}}
trap on_preempt USR1 TERM

srun --kill-on-bad-exit=1 {python} -m torch.distributed.run \\
  --nnodes="$SLURM_NNODES" --nproc-per-node={gpus} --node-rank="$SLURM_NODEID" \\
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head_node:$rdzv_port" \\
  -m tuneforge finetune -c {config} {overrides} &
train_pid=$!
wait "$train_pid" || status=$?
while [ "$preempted" = 1 ] && kill -0 "$train_pid" 2>/dev/null; do wait "$train_pid" || true; done
if [ "$preempted" = 1 ]; then
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit ${{status:-0}}
"""


def write_slurm_script(run: RunConfig, args) -> Path:
    run_dir = Path(run.output_dir).resolve() / run.name
    out = Path(args.out) if args.out else run_dir / "slurm.sbatch"
    extra = "\n".join(f"#SBATCH --{key}={value}" for key, value in
                      (("partition", args.partition), ("time", args.time), ("account", args.account)) if value)
    text = SLURM_TEMPLATE.format(
        job=run.name, nodes=args.nodes, gpus=args.gpus_per_node, cpus=args.cpus_per_gpu * args.gpus_per_node,
        run_dir=run_dir, extra=extra, workdir=shlex.quote(str(Path.cwd())), python=shlex.quote(sys.executable),
        config=shlex.quote(str(Path(args.config).resolve())),
        overrides=" ".join(shlex.quote(o) for o in args.overrides))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    return out
