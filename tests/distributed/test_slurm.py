"""The generated sbatch script: valid bash, the right torchrun line under a (fake) Slurm allocation, and
preemption turned into checkpoint-and-requeue."""
import os
import signal
import subprocess
import time

from tests.conftest import REPO, run_cli


def fake_slurm_bin(tmp_path, train_seconds: float):
    """scontrol / srun / pkill stand-ins that record how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-07\\ngpu-node-08\\n'; else echo "scontrol $*" >> {log}; fi
""")
    (bin_dir / "srun").write_text(f"""#!/usr/bin/env bash
echo "srun $*" >> {log}
case "$*" in *torch.distributed.run*) sleep {train_seconds};; esac
""")
    (bin_dir / "pkill").write_text(f"#!/usr/bin/env bash\necho \"pkill $*\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir, log


def write_script(tmp_path):
    out = run_cli("slurm", "-c", str(REPO / "recipes/quickstart.yaml"), "--nodes", "2", "--gpus-per-node", "4",
                  "--partition", "gpu", "--time", "02:00:00", "--account", "proj1", "--out",
                  str(tmp_path / "job.sbatch"), f"run.output_dir={tmp_path}/runs", "train.global_batch_size=64")
    path = tmp_path / "job.sbatch"
    assert out.stdout.strip() == str(path)
    return path


def slurm_env(bin_dir):
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_ID="4242")


def test_script_is_valid_bash_with_the_right_torchrun_line(tmp_path):
    path = write_script(tmp_path)
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --account=proj1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert line in text
    bin_dir, log = fake_slurm_bin(tmp_path, 0)
    proc = subprocess.run(["bash", str(path)], env=slurm_env(bin_dir), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    torchrun = next(line for line in calls.splitlines() if "torch.distributed.run" in line)
    for arg in ("--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--rdzv-id=4242", "--rdzv-backend=c10d",
                "--rdzv-endpoint=gpu-node-07:29500", "-m tuneforge finetune -c " + str(REPO / "recipes/quickstart.yaml"),
                "train.global_batch_size=64"):
        assert arg in torchrun, arg
    assert "requeue" not in calls


def test_preemption_signal_checkpoints_and_requeues(tmp_path):
    path = write_script(tmp_path)
    bin_dir, log = fake_slurm_bin(tmp_path, 3)
    proc = subprocess.Popen(["bash", str(path)], env=slurm_env(bin_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while "torch.distributed.run" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    calls = log.read_text()
    assert "pkill -USR1 -f" in calls and "-m tuneforge finetune" in calls
    assert "scontrol requeue 4242" in calls


def test_preemption_reaches_training_processes_not_torchrun(tmp_path):
    """torchrun starts each worker as `python -u -m tuneforge finetune`; the agent itself must not get USR1
    (its default action would kill the workers before they checkpoint)."""
    import re

    text = write_script(tmp_path).read_text()
    pattern = re.search(r'pkill -USR1 -f "([^"]+)"', text).group(1)
    worker = "/opt/venv/bin/python -u -m tuneforge finetune -c /x/recipe.yaml run.name=a"
    agent = "/opt/venv/bin/python -m torch.distributed.run --nnodes=2 -m tuneforge finetune -c /x/recipe.yaml"
    grep = lambda line: subprocess.run(["grep", "-qE", pattern], input=line, text=True).returncode == 0  # noqa: E731
    assert grep(worker) and not grep(agent)
