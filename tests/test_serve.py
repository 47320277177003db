"""`wina serve` over real HTTP on loopback: the official openai client gets `wina generate`'s text, bad input gets
OpenAI-style errors and the server goes on, concurrent clients are served in order within a bounded queue."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from tests.helpers import ROOT, build_tiny  # noqa: E402
from wina_convert import convert  # noqa: E402
from wina_convert.generate import Sampling, chat_ids, generate, prompt_ids  # noqa: E402
from wina_convert.serve import DecodeQueue, create_app, load_served  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTEXT = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama with a chat template, converted with calibration (uniform allocation: the quickest)."""
    root = tmp_path_factory.mktemp("serve")
    source = build_tiny("llama", root / "source", tiny_tokenizer_dir, max_position_embeddings=CONTEXT)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    out = root / "tiny-wina"
    convert(source, out, sparsity=0.5, samples=4, seq_len=64, allocation="uniform", head_sparsity=0, quiet=True)
    return out


class Running:
    """An ASGI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Lines(logging.Handler):
    """The server's log lines (one per request)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def wait_for(self, count: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            assert time.monotonic() < deadline, self.lines
            time.sleep(0.02)
        return self.lines


@pytest.fixture(scope="module")
def served(checkpoint):
    return load_served(checkpoint, max_tokens=600)


@pytest.fixture(scope="module")
def server(served):
    queue = DecodeQueue(served, depth=8)
    running = Running(create_app(served, queue))
    running.served, running.queue = served, queue
    logger = logging.getLogger("wina_convert.serve")
    lines = Lines()
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    running.log = lines
    yield running
    logger.removeHandler(lines)
    logger.setLevel(level)
    running.stop()
    queue.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = json.dumps(body) if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def expected(served, prompt: str, n: int, *, chat: bool, sampling: Sampling = Sampling(), stop=()):
    """What the library's generate makes of the same prompt: the text `wina generate` prints."""
    ids = chat_ids(served.encoder, [{"role": "user", "content": prompt}]) if chat else prompt_ids(served.encoder, prompt, chat=False)
    return generate(served.model, served.decoder, ids, n, sampling=sampling, stop=stop), len(ids)


def assert_error(status: int, body: dict, want_status: int, *needles: str, param: str | None = None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["type"], body
    for needle in needles:
        assert needle.lower() in json.dumps(body).lower(), (needle, body)
    if param is not None:
        assert body["error"]["param"] == param, body


# --------------------------------------------------------------------------- the openai client

def test_completion_and_chat_match_generate(client, server):
    served = server.served
    want, prompt_tokens = expected(served, "Once upon a time", 12, chat=False)
    got = client.completions.create(model=served.id, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, len(want.tokens))
    assert got.usage.total_tokens == prompt_tokens + len(want.tokens) and got.model == served.id

    want, prompt_tokens = expected(served, "Tell me about the sea", 12, chat=True)
    got = client.chat.completions.create(model=served.id, messages=[{"role": "user", "content": "Tell me about the sea"}],
                                         max_tokens=12, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, len(want.tokens))


def test_streaming_joins_to_the_same_text(client, server):
    served = server.served
    want, prompt_tokens = expected(served, "The river", 14, chat=True)
    chunks = list(client.chat.completions.create(model=served.id, messages=[{"role": "user", "content": "The river"}],
                                                 max_tokens=14, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    assert chunks[-1].usage.prompt_tokens == prompt_tokens

    want, _ = expected(served, "In the beginning", 14, chat=False)
    chunks = list(client.completions.create(model=served.id, prompt="In the beginning", max_tokens=14, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_sampling_seed_stop_and_top_p(client, server):
    served = server.served
    sampling = Sampling(temperature=0.9, top_p=0.8, seed=11)
    want, _ = expected(served, "A story", 12, chat=False, sampling=sampling)
    ask = dict(model=served.id, prompt="A story", max_tokens=12, temperature=0.9, top_p=0.8, seed=11)
    assert client.completions.create(**ask).choices[0].text == want.text
    assert client.completions.create(**ask).choices[0].text == want.text  # the seed, not the server's state

    whole, _ = expected(served, "A story", 24, chat=False)
    stop = whole.text[6:9]
    got = client.completions.create(model=served.id, prompt="A story", max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert got.choices[0].text == whole.text[:whole.text.index(stop)] and got.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [server.served.id]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == server.served.id


# --------------------------------------------------------------------------- bad input

def test_bad_input_gets_openai_errors_and_the_server_goes_on(server):
    sid = server.served.id
    good = {"model": sid, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    long_prompt = " ".join(["history"] * (CONTEXT + 50))
    cases = [
        ("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": ', 400, ("parse the json",), None),
        ("POST", "/v1/completions", b"\xff\xfe not utf-8", 400, ("json",), None),
        ("POST", "/v1/completions", b"[1, 2]", 400, ("json object",), None),
        ("POST", "/v1/completions", {**good, "frobnicate": True}, 400, ("unrecognized", "frobnicate"), "frobnicate"),
        ("POST", "/v1/chat/completions", {"model": sid, "messages": [{"role": "user", "content": "x"}], "colour": 1}, 400,
         ("colour",), "colour"),
        ("POST", "/v1/completions", {**good, "model": "gpt-4"}, 404, ("gpt-4", "model_not_found"), "model"),
        ("GET", "/v1/models/gpt-4", None, 404, ("model_not_found",), "model"),
        ("POST", "/v1/completions", {"model": sid, "max_tokens": 3}, 400, ("prompt",), "prompt"),
        ("POST", "/v1/completions", {**good, "prompt": long_prompt}, 400, ("context_length_exceeded",), None),
        ("POST", "/v1/completions", {**good, "max_tokens": 600, "prompt": " ".join(["history"] * 500)}, 400,
         ("context_length_exceeded",), None),
        ("POST", "/v1/completions", {**good, "max_tokens": 0}, 400, ("max_tokens",), "max_tokens"),
        ("POST", "/v1/completions", {**good, "max_tokens": -4}, 400, ("max_tokens",), "max_tokens"),
        ("POST", "/v1/completions", {**good, "max_tokens": 601}, 400, ("max_tokens", "600"), "max_tokens"),
        ("POST", "/v1/completions", {**good, "max_tokens": "many"}, 400, ("max_tokens",), "max_tokens"),
        ("POST", "/v1/completions", {**good, "temperature": 3}, 400, ("temperature",), "temperature"),
        ("POST", "/v1/completions", {**good, "n": 2}, 400, ("not supported",), "n"),
        ("POST", "/v1/completions", {**good, "prompt": ""}, 400, ("empty",), "prompt"),
        ("POST", "/v1/completions", {**good, "prompt": ["one", "two"]}, 400, ("one prompt",), "prompt"),
        ("POST", "/v1/completions", {**good, "prompt": [1, 2, 10**9]}, 400, ("token ids",), "prompt"),
        ("POST", "/v1/chat/completions", {"model": sid, "messages": []}, 400, ("messages",), "messages"),
        ("POST", "/v1/chat/completions", {"model": sid, "messages": [{"role": "wizard", "content": "x"}]}, 400, ("role",),
         "messages"),
        ("GET", "/v1/nowhere", None, 404, ("not_found",), None),
        ("GET", "/v1/completions", None, 405, ("method",), None),
    ]
    for method, path, body, status, needles, param in cases:
        got_status, got = raw(server, method, path, body)
        assert_error(got_status, got, status, *needles, param=param)
    status, body = raw(server, "POST", "/v1/completions", good)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_a_client_leaving_mid_stream_stops_the_generation(server, client):
    before = len(server.log.lines)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 600, "temperature": 0,
                                                        "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    line = server.log.wait_for(before + 1)[before]
    produced = int(re.search(r"(\d+) out", line).group(1))
    assert line.endswith("cancelled") and produced < 600, line
    want, _ = expected(server.served, "Once", 5, chat=False)  # and the next request is served
    assert client.completions.create(model=server.served.id, prompt="Once", max_tokens=5, temperature=0).choices[0].text == want.text


# --------------------------------------------------------------------------- concurrency

def _hold_the_worker(queue: DecodeQueue) -> threading.Event:
    """Occupy the decode worker until the returned event is set (a stand-in for a long generation)."""
    release = threading.Event()
    queue._executor.submit(release.wait, 60)
    return release


def _wait_waiting(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while raw(server, "GET", "/health")[1]["waiting"] != count:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_concurrent_clients_all_get_their_own_answer(server):
    prompts = [f"Story number {i} begins" for i in range(6)]
    wants = [expected(server.served, p, 8, chat=i % 2 == 1)[0].text for i, p in enumerate(prompts)]
    answers: dict[int, tuple[int, dict]] = {}
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        start.wait()
        if i % 2:
            body = {"model": server.served.id, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 8,
                    "temperature": 0}
            answers[i] = raw(server, "POST", "/v1/chat/completions", body)
        else:
            answers[i] = raw(server, "POST", "/v1/completions", {"prompt": prompts[i], "max_tokens": 8, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == list(range(len(prompts)))  # none lost
    for i, (status, body) in answers.items():
        assert status == 200, body
        choice = body["choices"][0]
        assert (choice["message"]["content"] if i % 2 else choice["text"]) == wants[i], i
    assert raw(server, "GET", "/health")[1] == {"status": "ok", "model": server.served.id, "running": 0, "waiting": 0}


def test_queue_is_bounded_and_served_in_arrival_order(server):
    queue, before = server.queue, len(server.log.lines)
    depth = queue.depth
    queue.depth = 1  # one decoding (here: the hold), one more waiting
    release = _hold_the_worker(queue)
    answers: dict[int, tuple[int, dict]] = {}
    try:
        def ask(i: int) -> None:
            answers[i] = raw(server, "POST", "/v1/completions", {"prompt": f"Arrival {i}", "max_tokens": 2 + i,
                                                                 "temperature": 0})

        threads = []
        for i in range(2):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
            _wait_waiting(server, i + 1)
        status, body = raw(server, "POST", "/v1/completions", {"prompt": "One too many", "max_tokens": 2})
        assert_error(status, body, 503, "queue_full")
    finally:
        release.set()
        queue.depth = depth
    for t in threads:
        t.join(timeout=60)
    for i in range(2):
        want, _ = expected(server.served, f"Arrival {i}", 2 + i, chat=False)
        assert answers[i][0] == 200 and answers[i][1]["choices"][0]["text"] == want.text
    # served in arrival order: the log has the first request's line (2 tokens out) before the second's (3)
    lines = server.log.wait_for(before + 2)[before:]
    assert [int(re.search(r"(\d+) out", line).group(1)) for line in lines] == [2, 3]


def test_a_request_whose_client_left_while_waiting_is_not_generated(server):
    before = len(server.log.lines)
    release = _hold_the_worker(server.queue)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Gone", "max_tokens": 50, "temperature": 0}))
        _wait_waiting(server, 1)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        time.sleep(0.6)  # the handler looks every 0.25 s
    finally:
        release.set()
    line = server.log.wait_for(before + 1)[before]
    assert " 0 out" in line and line.endswith("cancelled"), line


def test_api_key_is_checked_on_every_request(server):
    keyed = Running(create_app(server.served, server.queue, api_key="s3cret"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/completions")):
                status, body = raw(keyed, method, path, {"prompt": "x"} if method == "POST" else None, headers)
                assert_error(status, body, 401, "invalid_api_key")
        good = openai.OpenAI(base_url=keyed.url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=server.served.id, prompt="Key", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url, api_key="nope", max_retries=0).models.list()
    finally:
        keyed.stop()


# --------------------------------------------------------------------------- the command

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_wina_serve_answers_and_stops_on_ctrl_c(checkpoint):
    process = subprocess.Popen([sys.executable, "-m", "wina_convert", "serve", str(checkpoint), "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env=_env())
    try:
        started = process.stderr.readline()
        match = re.search(r"serving tiny-wina \(sparsity 0\.50, cpu\) at http://127\.0\.0\.1:(\d+)/v1", started)
        assert match, started
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="tiny-wina", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=600, temperature=0, stream=True)
        next(iter(stream))  # a generation is running
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "interrupted", rest
    assert re.search(r"/v1/chat/completions: \d+ tokens in, \d+ out, .*cancelled", rest), rest


def test_without_the_extra_wina_serve_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from wina_convert.cli import main\n"
            f"sys.exit(main(['serve', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: wina serve needs the serve extra (uvicorn is not installed): pip install 'wina-convert[serve]'"]


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_served_text_equals_wina_generate_on_smollm2(smollm2_converted, capsys):
    """At temperature 0 the server answers what `wina generate` prints, chat and raw, on SmolLM2."""
    from wina_convert.cli import main

    prompt, n = "What is the capital of France? Answer in one sentence.", 32
    printed = {}
    for mode in ("--chat", "--raw"):
        capsys.readouterr()
        assert main(["generate", str(smollm2_converted), prompt, "-n", str(n), mode]) == 0
        printed[mode] = capsys.readouterr().out.removesuffix("\n")
    served = load_served(smollm2_converted)
    queue = DecodeQueue(served)
    running = Running(create_app(served, queue))
    try:
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(model=served.id, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=n, temperature=0)
        raw_text = client.completions.create(model=served.id, prompt=prompt, max_tokens=n, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=served.id, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0, stream=True)
            if c.choices)
    finally:
        running.stop()
        queue.close()
    assert printed["--chat"].strip() and "Paris" in printed["--chat"]
    assert chat.choices[0].message.content == printed["--chat"] == streamed
    assert raw_text.choices[0].text == printed["--raw"]
