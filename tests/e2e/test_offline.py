"""No network access for a local model, nor for any model with HF_HUB_OFFLINE=1: the CLI runs in a subprocess
whose every outgoing connection (and host lookup) is refused and recorded."""
import os
import subprocess
import sys

from tests.conftest import REPO, tiny_overrides

BLOCKER = '''
import os, socket

def _refuse(what):
    with open(os.environ["TUNEFORGE_TEST_CONNECTIONS"], "a") as f:
        f.write(f"{what}\\n")
    raise OSError(101, f"network blocked by the test ({what})")

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(address)
    return _connect(self, address)

def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(address)
    return _connect_ex(self, address)

def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1"):
        _refuse(host)
    return _getaddrinfo(host, *args, **kwargs)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def blocked(tmp_path, *args, **env):
    """Run python with the blocker installed (sitecustomize) and a Hub cache with nothing in it."""
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker/sitecustomize.py").write_text(BLOCKER)
    base = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    full = dict(base, PYTHONPATH=f"{tmp_path / 'blocker'}{os.pathsep}{REPO}", HF_HOME=str(tmp_path / "hf"),
                TUNEFORGE_TEST_CONNECTIONS=str(tmp_path / "connections.log"), **env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=300)


def connections(tmp_path) -> list[str]:
    log = tmp_path / "connections.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_blocker_refuses_and_records(tmp_path):
    proc = blocked(tmp_path, "-c", "import socket; socket.create_connection(('huggingface.co', 443))")
    assert proc.returncode != 0 and "network blocked by the test" in proc.stderr
    assert connections(tmp_path) == ["huggingface.co"]


def test_local_model_trains_without_network_even_online(tiny_recipe, tmp_path):
    proc = blocked(tmp_path, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe),
                   *tiny_overrides(tmp_path, "local", "train.max_steps=2", "logging.tensorboard=true"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "local/final/adapter_model.safetensors").is_file()
    assert connections(tmp_path) == []


def test_offline_hub_id_that_is_not_cached_is_one_line(tiny_recipe, tmp_path):
    proc = blocked(tmp_path, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe),
                   *tiny_overrides(tmp_path, "hub", "model.name_or_path=tuneforge-test/not-cached"), HF_HUB_OFFLINE="1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tuneforge: error: model.name_or_path"), \
        proc.stderr
    assert "'tuneforge-test/not-cached' is no local directory and is not in the Hub cache" in lines[0]
    assert connections(tmp_path) == []
