"""`tuneforge serve`: a finished run's model behind an OpenAI-compatible HTTP API. vLLM's own server when vLLM and a
GPU are there (the adapter as a vLLM LoRA module), else a transformers engine that batches concurrent requests.
FastAPI and uvicorn come with the `serve` extra and are imported only here."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.models.load import resolve_precision
from tuneforge.run.load import load_run
from tuneforge.run.model import load_run_model
from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.limits import Limits
from tuneforge.serve.vllm import check_vllm, use_vllm, vllm_serve_command


def import_web_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve: FastAPI and uvicorn are not installed: pip install 'tuneforge[serve]'") from None
    return uvicorn


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file, or the Jinja template itself (as vLLM's flag takes it)."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template {value}: cannot read ({e.__class__.__name__}); pass a Jinja file or the "
                        "template itself") from None


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen before loading the model, so a taken port fails in a second with one line, not after the load."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    # Listening now (uvicorn's backlog) means a client that connects as soon as the address is printed waits in the
    # queue until the server accepts; a socket that is only bound refuses it (seen under load).
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_limits(limits: Limits) -> None:
    for name, value in vars(limits).items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def build_server(run_dir: str | Path, sock: socket.socket, api_key: str | None = None, limits: Limits | None = None,
                 chat_template: str | None = None, overrides: list[str] | None = None):
    """(uvicorn.Server, engine) serving the run's model with the transformers engine on `sock`;
    `server.run(sockets=[sock])` serves until `server.should_exit` is set."""
    uvicorn = import_web_stack()
    from tuneforge.serve.app import Served, build_app
    limits = limits or Limits()
    check_limits(limits)
    model, tokenizer, cfg = load_run_model(run_dir, overrides=overrides)
    precision = resolve_precision(cfg.model.dtype, model.device.type)
    engine = TransformersEngine(model, tokenizer, precision, max_batch_rows=limits.max_concurrent)
    # The template the run trained its chat data with comes before the tokenizer's own (as in training).
    template = chat_template or cfg.data.chat_template or getattr(tokenizer, "chat_template", None)
    app = build_app(Served(engine, tokenizer, cfg.run.name, limits, template), api_key)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    return uvicorn.Server(config), engine


def serve_run(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, engine: str = "auto",
              api_key: str | None = None, limits: Limits | None = None, chat_template: str | None = None) -> int:
    check_limits(limits or Limits())
    template = load_chat_template(chat_template)
    cfg, final = load_run(run_dir)
    if engine == "vllm":
        check_vllm(final)
    if engine == "vllm" or (engine == "auto" and use_vllm(final)):
        command = vllm_serve_command(cfg, final, host, port, chat_template)
        print(f"tuneforge: serving with vLLM: {' '.join(command)}", flush=True)
        env = dict(os.environ, **({"VLLM_API_KEY": api_key} if api_key else {}))
        os.execvpe(command[0], command, env)  # vLLM's server takes this process over (signals included)
    import_web_stack()
    if api_key is None and not is_loopback(host):
        print(f"tuneforge: warning: serving on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    sock = bind_socket(host, port)
    server, batcher = build_server(run_dir, sock, api_key, limits, template)
    shown = f"[{host}]" if ":" in host else host
    print(f"tuneforge: serving {run_dir} as model {cfg.run.name!r} at http://{shown}:{sock.getsockname()[1]}/v1 "
          "(engine transformers; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])  # uvicorn shuts down gracefully on Ctrl-C, then raises it again
    except KeyboardInterrupt:
        print("tuneforge: server stopped", file=sys.stderr)
    finally:
        batcher.close()
        sock.close()
    return 0
