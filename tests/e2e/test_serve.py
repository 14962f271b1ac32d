"""`tuneforge serve`: a trained adapter on the shipped model, served on loopback and queried with the official
`openai` client. Greedy answers equal `tuneforge generate`'s; concurrent requests share batches; bad requests get
their 4xx and the server goes on serving."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, SQUAD_TRAIN, STORIES, tiny_overrides
from tests.tiny_recipes import one_torch_thread  # noqa: F401 (autouse)
from tuneforge import cli

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tuneforge.api import finetune

    recipe = {"model": {"name_or_path": str(STORIES)}, "peft": {"method": "lora", "lora_rank": 4, "lora_alpha": 8},
              "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}}}
    with pytest.MonkeyPatch.context() as mp:  # the report's plots are tested elsewhere
        mp.setattr("tuneforge.train.recipe.write_report", lambda run: run / "report.html")
        return finetune(recipe, tiny_overrides(tmp_path_factory.mktemp("serve"), "served", "train.max_steps=2",
                                               "data.train.limit=16", "data.seq_length=128"))


@pytest.fixture(scope="module")
def run_model(run_dir):
    from tuneforge.run.model import load_run_model

    return load_run_model(run_dir)


def greedy(run_model, prompt: str, max_new_tokens: int) -> str:
    """What `tuneforge generate --run DIR --prompt PROMPT --max-new-tokens N` prints."""
    from tuneforge.eval.generate import generate

    model, tokenizer, _ = run_model
    return generate(model, tokenizer, [prompt], max_new_tokens)[0]


@pytest.fixture(scope="module")
def server(run_dir):
    from tuneforge.serve import Limits, bind_socket, build_server

    sock = bind_socket("127.0.0.1", 0)
    limits = Limits(max_prompt_tokens=64, max_new_tokens=32, max_concurrent=32, max_body_bytes=4096)
    server, engine = build_server(run_dir, sock, api_key=KEY, limits=limits, chat_template=TEMPLATE)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def health(server: str) -> dict:
    with urllib.request.urlopen(server + "/health") as r:
        return json.loads(r.read())


def test_completions_greedy_equal_generate_streaming_or_not(client, run_model):
    expected = greedy(run_model, PROMPT, 24)
    assert expected  # the comparison below means something
    out = client.completions.create(model="served", prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 24
    assert out.usage.prompt_tokens == len(run_model[1](PROMPT)["input_ids"])
    chunks = list(client.completions.create(model="served", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert len(chunks) > 3  # token by token, not the final text at once
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    # a list of prompts: one choice each, in order; a shorter max_tokens cuts the same greedy text
    second = "The little dog"
    out = client.completions.create(model="served", prompt=[PROMPT, second], max_tokens=6, temperature=0)
    assert [c.text for c in out.choices] == [greedy(run_model, PROMPT, 6), greedy(run_model, second, 6)]


def test_chat_renders_the_template_streaming_or_not(client, run_model):
    model, tokenizer, _ = run_model
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           chat_template=TEMPLATE)
    assert prompt == "system: Tell a story.\nuser: A cat\nassistant:"
    expected = greedy(run_model, prompt, 16)
    out = client.chat.completions.create(model="served", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="served", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_sampling_settings_seed_n_and_stop(client, run_model):
    def sample(**kw):
        return [c.text for c in client.completions.create(model="served", prompt=PROMPT, max_tokens=12, **kw).choices]

    first = sample(temperature=1.0, seed=7, n=3)
    assert len(first) == 3 and len(set(first)) > 1  # three different samples ...
    assert sample(temperature=1.0, seed=7, n=3) == first  # ... that the seed repeats
    assert sample(temperature=1.0, seed=8, n=3) != first
    expected = greedy(run_model, PROMPT, 12)
    # sampling among the one most likely token, or within a tiny top-p mass, is greedy decoding
    assert sample(temperature=1.5, extra_body={"top_k": 1}) == [expected]
    assert sample(temperature=1.5, top_p=1e-6, seed=1) == [expected]
    stop = expected[len(expected) // 2:][:3]
    cut = expected[:expected.index(stop)]
    out = client.completions.create(model="served", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="served", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut  # a stop string never leaks into a stream


def test_sixteen_concurrent_requests_succeed_in_fewer_batches(client, server, run_model):
    prompts = [f"{PROMPT} {word}" for word in "a cat dog sun sky tree ball girl boy car bird fish hat cup red big"
               .split()]
    before = health(server)
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: client.completions.create(model="served", prompt=p, max_tokens=8,
                                                                 temperature=0), prompts))
    after = health(server)
    assert all(o.choices[0].finish_reason in ("stop", "length") and o.choices[0].text for o in outs)
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16


def test_one_batch_gives_each_request_its_own_answer(run_model):
    """Requests batched together, with their own max_tokens and n, get exactly their one-at-a-time greedy answers
    (prompts of one length: left padding could move fp32 logits by a rounding)."""
    from tuneforge.eval.generate import Sampling
    from tuneforge.models.load import resolve_precision
    from tuneforge.serve.engine import Job, TransformersEngine

    model, tokenizer, _ = run_model
    prompts = [f"{PROMPT} {w}" for w in ("cat", "dog", "sun")]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 1
    engine = TransformersEngine(model, tokenizer, resolve_precision("float32", "cpu"))
    try:
        jobs = [Job([prompts[0]], 8, Sampling()), Job(prompts[1:], 3, Sampling(), n=2)]
        engine.run_batch(jobs)
        assert engine.stats["batches"] == 1 and engine.stats["requests"] == 2
        assert [(c.text, c.finish_reason, c.tokens) for c in jobs[0].future.result()] == \
            [(greedy(run_model, prompts[0], 8), "length", 8)]
        assert [c.text for c in jobs[1].future.result()] == [greedy(run_model, p, 3) for p in prompts[1:]
                                                             for _ in range(2)]
    finally:
        engine.close()


def post(server: str, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(server + path, data=body, headers=headers)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BAD = [  # (what, path, body, key, status, part of the message)
    ("oversized prompt", "/v1/completions", {"prompt": "once upon a time " * 40}, KEY, 400,
     "is over the server's limit of 64 (--max-prompt-tokens)"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -5}, KEY, 400,
     "max_tokens: must be >= 1, got -5"),
    ("max_tokens over the limit", "/v1/completions", {"prompt": "x", "max_tokens": 33}, KEY, 400,
     "max_tokens: 33 is over the server's limit of 32"),
    ("malformed JSON", "/v1/completions", b'{"model": "served", "prompt": ', KEY, 400, "request body is not valid JSON"),
    ("JSON that is not an object", "/v1/completions", [1, 2], KEY, 400, "must be a JSON object, got list"),
    ("wrong key", "/v1/completions", {"prompt": "x"}, "nope", 401, "missing or wrong API key"),
    ("no key", "/v1/models", None, None, 401, "missing or wrong API key"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, KEY, 404,
     "model \"gpt-4\" does not exist; this server serves 'served'"),
    ("body too large", "/v1/completions", {"prompt": "x" * 5000}, KEY, 413, "over the server's limit of 4096 bytes"),
    ("temperature out of range", "/v1/completions", {"prompt": "x", "temperature": 3}, KEY, 400,
     "temperature: must be in [0, 2], got 3"),
    ("text where a number goes", "/v1/completions", {"prompt": "x", "top_p": "high"}, KEY, 400,
     "top_p: expected a number, got \"high\""),
    ("unsupported parameter", "/v1/completions", {"prompt": "x", "logprobs": 2}, KEY, 400, "logprobs: not supported"),
    ("prompt of numbers", "/v1/completions", {"prompt": [1, 2]}, KEY, 400, "prompt: expected a string"),
    ("chat without messages", "/v1/chat/completions", {"messages": []}, KEY, 400, "messages: expected a non-empty"),
    ("chat with an image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     KEY, 400, "messages[0].content: only text parts are supported"),
    ("unknown path", "/v1/embeddings", {"input": "x"}, KEY, 404, "POST /v1/embeddings: Not Found"),
]


@pytest.mark.parametrize("what, path, body, key, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_and_the_server_keeps_serving(server, run_model, what, path, body, key, status, message):
    if isinstance(body, dict):
        body = json.dumps({"model": "served", **body}).encode()
    elif body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    got, answer = post(server, path, body, key) if body is not None else get(server, path, key)
    assert got == status, answer
    assert message in answer["error"]["message"], answer
    got, answer = post(server, "/v1/completions", json.dumps({"model": "served", "prompt": PROMPT, "max_tokens": 4,
                                                               "temperature": 0}).encode())
    assert got == 200 and answer["choices"][0]["text"] == greedy(run_model, PROMPT, 4)


def get(server: str, path: str, key: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_errors_name_the_problem(server, client):
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens: must be >= 1"):
        client.chat.completions.create(model="served", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert [m.id for m in client.models.list()] == ["served"]


def test_chat_without_a_template_is_a_400():
    from tuneforge.serve.app import Served
    from tuneforge.serve.limits import ApiError, Limits
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    assert not getattr(tokenizer, "chat_template", None)  # stories260K has none
    served = Served(engine=None, tokenizer=tokenizer, name="served", limits=Limits(), chat_template=None)
    with pytest.raises(ApiError, match="'served' has no chat template: use /v1/completions, or restart the server "
                                       "with --chat-template FILE") as e:
        served.render_chat([{"role": "user", "content": "x"}])
    assert e.value.status == 400


def test_cli_serve_and_query(run_dir, run_model, capsys):
    # one intra-op thread, as in this process: the greedy answers are compared bit for bit
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNEFORGE_API_KEY=KEY, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--run", str(run_dir), "--port", "0",
                             "--engine", "auto"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "engine transformers" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        for extra in ([], ["--stream"]):
            code = cli.main(["query", "--url", url, "--prompt", PROMPT, "--max-tokens", "10", "--api-key", KEY,
                             *extra])
            out, err = capsys.readouterr()
            assert (code, out) == (0, greedy(run_model, PROMPT, 10) + "\n"), err
        assert cli.main(["query", "--url", url, "--prompt", PROMPT, "--api-key", "wrong"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"tuneforge: error: --url {url}: the server answered 401: missing or wrong API key: send the "
                       "header 'Authorization: Bearer KEY'"]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()  # Ctrl-C is how a server is stopped: exit 0


def test_serve_on_a_taken_port_is_one_line(run_dir, capsys):
    from tuneforge.serve import bind_socket

    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert cli.main(["serve", "--run", str(run_dir), "--port", str(port), "--engine", "transformers"]) == 2
    finally:
        taken.close()
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in capsys.readouterr().err


def test_vllm_command_serves_the_adapter_as_a_lora_module(run_dir, tmp_path):
    from tuneforge.run.load import load_run
    from tuneforge.serve.vllm import vllm_serve_command, vllm_servable

    cfg, final = load_run(run_dir)
    assert vllm_servable(final) is None
    assert vllm_serve_command(cfg, final, "127.0.0.1", 8000) == [
        "vllm", "serve", str(STORIES), "--enable-lora", "--lora-modules", f"served={final.resolve()}",
        "--max-lora-rank", "8", "--host", "127.0.0.1", "--port", "8000"]
    full = tmp_path / "final"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert vllm_serve_command(cfg, full, "0.0.0.0", 9000, chat_template="t.jinja") == [
        "vllm", "serve", str(full.resolve()), "--served-model-name", "served", "--host", "0.0.0.0", "--port", "9000",
        "--chat-template", "t.jinja"]
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert vllm_servable(ia3) == "vLLM serves LoRA adapters only, and this run holds ia3"
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    assert vllm_servable(ia3) == "vLLM does not serve DoRA adapters"


def test_requests_over_max_concurrent_get_429_until_one_finishes(tmp_path):
    """An engine that holds its one job until told: a second request is refused, and served once the first ends."""

    from transformers import AutoTokenizer

    from tuneforge.serve import bind_socket
    from tuneforge.serve.app import Served, build_app
    from tuneforge.serve.engine import Choice
    from tuneforge.serve.limits import Limits
    import uvicorn

    class HeldEngine:
        name, stats, jobs = "held", {}, []

        def submit(self, job):
            self.jobs.append(job)
            return job.future

    engine = HeldEngine()
    served = Served(engine, AutoTokenizer.from_pretrained(STORIES), "m", Limits(max_concurrent=1), None)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 2}).encode()
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, "/v1/completions", body, None)
            while not engine.jobs:
                time.sleep(0.01)
            status, answer = post(url, "/v1/completions", body, None)
            assert status == 429 and "1 requests in flight (--max-concurrent)" in answer["error"]["message"]
            engine.jobs[0].future.set_result([Choice("ok", "length", 2)])
            assert first.result(timeout=10)[1]["choices"][0]["text"] == "ok"
        engine.jobs.clear()
        threading.Timer(0.2, lambda: engine.jobs[0].future.set_result([Choice("again", "stop", 1)])).start()
        assert post(url, "/v1/completions", body, None)[1]["choices"][0]["text"] == "again"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
