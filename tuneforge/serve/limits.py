"""What a request may ask for, and the OpenAI-style 4xx errors for what it may not. Everything here runs before a
request reaches the engine, so a bad request costs the server nothing."""
from __future__ import annotations

import json
from dataclasses import dataclass

from tuneforge.eval.generate import Sampling
from tuneforge.serve.engine import Job


# Parameters of the OpenAI API that change what comes back and that this server does not implement: refusing them
# beats returning something the client did not ask for.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions", "tool_choice",
               "response_format")
MAX_STOP_STRINGS = 4  # as in the OpenAI API


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_concurrent: int = 64  # requests in flight (queued or generating); more get 429
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else
                                             "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


async def read_json(request, limits: Limits) -> dict:
    """The request body as a JSON object, read no further than max_body_bytes."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"request body over the server's limit of {limits.max_body_bytes} bytes "
                            "(--max-body-bytes)", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_big
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 JSON", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}",
                       code="invalid_json")
    return payload


def field(payload: dict, name: str, kinds: tuple, default=None):
    value = payload.get(name, default)
    if value is None or isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    expected = "a number" if float in kinds else " or ".join(names[k] for k in kinds)
    raise ApiError(400, f"{name}: expected {expected}, got {json.dumps(value)[:60]}", param=name)


def at_least(payload: dict, name: str, value, low, what: str = ">="):
    if value is not None and (value < low if what == ">=" else value <= low):
        raise ApiError(400, f"{name}: must be {what} {low}, got {value}", param=name)
    return value


def build_job(payload: dict, prompts: list[str], limits: Limits, count_tokens, default_max_tokens: int,
              add_special_tokens: bool = True):
    """A Job from an OpenAI request's decoding fields (the prompts already rendered); checks every limit."""
    for name in UNSUPPORTED:
        if payload.get(name) not in (None, False, 0, [], {}):
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    max_tokens = field(payload, "max_completion_tokens", (int,)) or field(payload, "max_tokens", (int,))
    max_tokens = at_least(payload, "max_tokens", default_max_tokens if max_tokens is None else max_tokens, 1)
    if max_tokens > limits.max_new_tokens:
        raise ApiError(400, f"max_tokens: {max_tokens} is over the server's limit of {limits.max_new_tokens} "
                            "(--max-new-tokens)", param="max_tokens")
    # OpenAI's default temperature is 1 (sampling); 0 is greedy, exactly `tuneforge generate`'s default output.
    temperature = field(payload, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature: must be in [0, 2], got {temperature}", param="temperature")
    top_p = field(payload, "top_p", (int, float))
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p: must be in (0, 1], got {top_p}", param="top_p")
    top_k = field(payload, "top_k", (int,))
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k: must be >= 1, or 0 / -1 for no top-k filter, got {top_k}", param="top_k")
    top_k = top_k if top_k and top_k > 0 else None
    n = at_least(payload, "n", field(payload, "n", (int,), 1), 1)
    seed = field(payload, "seed", (int,))
    stop = field(payload, "stop", (str, list)) or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"stop: expected a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")
    if len(prompts) * n > limits.max_concurrent:
        raise ApiError(400, f"n: {len(prompts)} prompt(s) x n={n} continuations is over the server's limit of "
                            f"{limits.max_concurrent} (--max-concurrent)", param="n")
    for prompt in prompts:
        tokens = count_tokens(prompt)
        if tokens > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt: {tokens} tokens is over the server's limit of {limits.max_prompt_tokens} "
                                "(--max-prompt-tokens)", param="prompt", code="context_length_exceeded")
    greedy = temperature == 0
    sampling = Sampling(float(temperature), None if greedy else top_p, None if greedy else top_k,
                        None if greedy else seed)
    return Job(prompts, max_tokens, sampling, tuple(s for s in stop if s), n, add_special_tokens)


def chat_messages(payload: dict) -> list[dict]:
    """OpenAI chat messages as {role, content: str} for a chat template (text content parts joined)."""
    messages = field(payload, "messages", (list,))
    if not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where}: expected an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompts(payload: dict) -> list[str]:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise ApiError(400, "prompt: expected a string or a non-empty list of strings", param="prompt")
