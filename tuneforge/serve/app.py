"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (server-sent events
when `stream` is true), and /health with the engine's counters."""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tuneforge.serve.engine import Choice, Job
from tuneforge.serve.limits import ApiError, Limits, build_job, chat_messages, completion_prompts, read_json

log = logging.getLogger(__name__)


class Served:
    """What the routes need: the engine, the model's name, a tokenizer of their own (the engine's thread uses the
    other one; a fast tokenizer must not be used from two threads at once), the chat template and the limits."""

    def __init__(self, engine, tokenizer, name: str, limits: Limits, chat_template: str | None):
        self.engine, self.name, self.limits, self.chat_template = engine, name, limits, chat_template
        self.tokenizer = copy.deepcopy(tokenizer)
        self.in_flight = 0
        self.created = int(time.time())

    def check_model(self, payload: dict) -> None:
        model = payload.get("model")
        if model is not None and model != self.name:  # left out (curl users do): the one model served
            raise ApiError(404, f"model {json.dumps(model)} does not exist; this server serves {self.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def count_tokens(self, add_special_tokens: bool):
        return lambda text: len(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        if not self.chat_template:
            raise ApiError(400, f"{self.name!r} has no chat template: use /v1/completions, or restart the server "
                                "with --chat-template FILE", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      chat_template=self.chat_template)
        except Exception as e:  # jinja's TemplateError, or a template's own raise_exception()
            raise ApiError(400, f"messages: the chat template rejected them ({e})", param="messages") from None


def build_app(served: Served, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths (404), wrong methods (405)
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "engine": served.engine.name, "in_flight": served.in_flight,
                **served.engine.stats}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "tuneforge"}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        payload = await read_json(request, served.limits)
        served.check_model(payload)
        job = build_job(payload, completion_prompts(payload), served.limits, served.count_tokens(True),
                        default_max_tokens=16)  # OpenAI's default for completions
        return await answer(job, payload, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        payload = await read_json(request, served.limits)
        served.check_model(payload)
        prompt = served.render_chat(chat_messages(payload))
        # A template that writes the BOS token itself must not get a second one from the tokenizer.
        bos = served.tokenizer.bos_token
        special = not (bos and prompt.startswith(bos))
        job = build_job(payload, [prompt], served.limits, served.count_tokens(special),
                        default_max_tokens=served.limits.max_new_tokens, add_special_tokens=special)
        return await answer(job, payload, chat=True)

    async def answer(job: Job, payload: dict, chat: bool):
        if served.in_flight >= served.limits.max_concurrent:
            raise ApiError(429, f"the server is busy: {served.limits.max_concurrent} requests in flight "
                                "(--max-concurrent); retry shortly", code="too_many_requests")
        stream = bool(payload.get("stream"))
        include_usage = stream and bool((payload.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        if stream:
            job.on_text = lambda index, text: loop.call_soon_threadsafe(events.put_nowait, (index, text))

        def finished():
            served.in_flight -= 1
            events.put_nowait(None)

        # A request counts until its job is done (or cancelled before it ran), however its client goes away.
        served.in_flight += 1
        future = served.engine.submit(job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(finished))
        if stream:
            return StreamingResponse(stream_events(job, events, chat, include_usage), media_type="text/event-stream")
        try:
            choices = await asyncio.wrap_future(future)
        except Exception as e:
            log.exception("request failed")
            raise ApiError(500, f"generation failed: {e.__class__.__name__}: {e}") from None
        return response(job, choices, chat)

    def usage(job: Job, choices: list[Choice]) -> dict:
        count = served.count_tokens(job.add_special_tokens)
        prompt = sum(count(p) for p in job.prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(chat: bool, chunk: bool, rid: str, choices: list[dict]) -> dict:
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and chunk else "")
        return {"id": rid, "object": kind, "created": int(time.time()), "model": served.name, "choices": choices}

    def response(job: Job, choices: list[Choice], chat: bool) -> dict:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if chat:
            out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(choices)]
        else:
            out = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for i, c in enumerate(choices)]
        return {**envelope(chat, False, rid, out), "usage": usage(job, choices)}

    async def stream_events(job: Job, events: asyncio.Queue, chat: bool, include_usage: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        count = len(job.prompts) * job.n

        def sse(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**envelope(chat, True, rid, choices), **extra})}\n\n"

        def piece(index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

        if chat:
            yield sse([piece(i, None, role=True) for i in range(count)])
        while (event := await events.get()) is not None:
            yield sse([piece(*event)])
        try:
            choices = job.future.result()
        except Exception as e:  # the response has started: the error goes in the stream, as OpenAI's does
            log.exception("request failed")
            yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}').body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield sse([piece(i, None, c.finish_reason) for i, c in enumerate(choices)])
        if include_usage:
            yield sse([], usage=usage(job, choices))
        yield "data: [DONE]\n\n"

    return app
