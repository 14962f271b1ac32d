"""`tuneforge query`: a small client for any OpenAI-compatible server (tuneforge's or vLLM's), standard library
only, so it works from an environment without the `serve` extra."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator

from tuneforge.errors import UserError


def api_base(url: str) -> str:
    """http://host:port, http://host:port/ and http://host:port/v1 all name the same server."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url {url}: expected http://HOST:PORT")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def open_url(url: str, path: str, payload: dict | None, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(api_base(url) + path, data=data, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise UserError(f"--url {url}: the server answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"--url {url}: cannot reach the server ({getattr(e, 'reason', e)})") from None


def served_model(url: str, api_key: str | None, timeout: float) -> str:
    with open_url(url, "/models", None, api_key, timeout) as response:
        models = json.loads(response.read())["data"]
    if not models:
        raise UserError(f"--url {url}: the server lists no model")
    return models[-1]["id"]  # vLLM lists the base model first and the LoRA module (the run's model) after it


def query(url: str, prompt: str, chat: bool = False, model: str | None = None, api_key: str | None = None,
          stream: bool = False, timeout: float = 600, **decoding) -> Iterator[str]:
    """The completion of `prompt` (pieces as they arrive when `stream`, else the whole text at once)."""
    payload = {"model": model or served_model(url, api_key, timeout), "stream": stream,
               **{k: v for k, v in decoding.items() if v is not None}}
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    path = "/chat/completions" if chat else "/completions"
    with open_url(url, path, payload, api_key, timeout) as response:
        if not stream:
            choice = json.loads(response.read())["choices"][0]
            yield choice["message"]["content"] if chat else choice["text"]
            return
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise UserError(f"--url {url}: {event['error']['message']}")
            for choice in event["choices"]:
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    yield text
