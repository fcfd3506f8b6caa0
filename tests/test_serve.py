"""specx serve: the real server (uvicorn on 127.0.0.1, a free port, a background thread) driven by real clients
(httpx and the openai package). Answers equal Generator.generate on the same prompt, alone or concurrent; errors are
OpenAI's error JSON; a full queue is a 429; a client that leaves mid-stream frees the model."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from specx.runtime import Generator, TextStream  # noqa: E402
from specx.server.app import create_app  # noqa: E402
from specx.server.engine import StopText  # noqa: E402

TEMPLATE = ("{% for message in messages %}{{ '<s>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")
PROMPTS = ["one two three", "the quick brown", "def f(x):", "jumps over the"]
TOKENS = 24
STARTUP_SECONDS = 30.0


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory: pytest.TempPathFactory, llama_bundle: Path) -> Path:
    """The tiny llama with a chat template written into (a copy of) its manifest."""
    path = tmp_path_factory.mktemp("serve") / "tiny-llama-chat"
    shutil.copytree(llama_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tokenizer"]["chat_template"] = TEMPLATE
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def solo(chat_bundle: Path) -> Generator:
    """A Generator of its own, for the answers a request should get alone."""
    return Generator.load(chat_bundle, provider="cpu")


@contextlib.contextmanager
def running(app) -> Iterator[str]:  # noqa: ANN001
    """Serve ``app`` on 127.0.0.1 (a port the OS picks) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def url(chat_bundle: Path) -> Iterator[str]:
    with running(create_app(Generator.load(chat_bundle, provider="cpu"))) as base:
        yield base


class Paced:
    """A Generator whose streams wait for ``gate`` and ``delay`` seconds before each piece: a request that holds the
    model as long as a test needs. ``pieces`` counts the pieces each stream (in order of start) produced."""

    def __init__(self, generator: Generator, delay: float = 0.0):
        self._generator = generator
        self.gate = threading.Event()
        self.delay = delay
        self.pieces: list[int] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._generator, name)

    def stream(self, *args, **kwargs) -> TextStream:  # noqa: ANN002, ANN003
        inner = self._generator.stream(*args, **kwargs)
        outer = TextStream(iter(()))
        outer._pieces = self._paced(inner, outer)
        return outer

    def _paced(self, inner: TextStream, outer: TextStream) -> Iterator[str]:
        index = len(self.pieces)
        self.pieces.append(0)
        with inner:
            for piece in inner:
                self.gate.wait()
                time.sleep(self.delay)
                self.pieces[index] += 1
                yield piece
        outer.result = inner.result


def _complete(url: str, **body) -> dict:  # noqa: ANN003
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _events(lines: Iterator[str]) -> list[str]:
    """The data of each server-sent event, [DONE] included."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def _streamed(url: str, path: str, **body) -> tuple[str, list[dict]]:  # noqa: ANN003
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                   for c in chunks if c["choices"])
    return text, chunks


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- answers ---------------------------------------------------------------------------------------------------------
def test_completions_equal_generate(url, solo):
    """Non-streaming and streaming text is Generator.generate's, greedy, same max tokens; usage counts tokens."""
    for prompt in PROMPTS[:2]:
        expected = solo.generate(prompt, max_new_tokens=TOKENS)
        body = _complete(url, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected.text
        assert body["usage"] == {"prompt_tokens": expected.stats.prompt_tokens,
                                 "completion_tokens": len(expected.tokens),
                                 "total_tokens": expected.stats.prompt_tokens + len(expected.tokens)}
        eos = solo.bundle.manifest.tokenizer.eos_token_ids
        reason = "stop" if expected.tokens[-1] in eos else "length"
        assert body["choices"][0]["finish_reason"] == reason
        text, chunks = _streamed(url, "/v1/completions", prompt=prompt, max_tokens=TOKENS,
                                 stream_options={"include_usage": True})
        assert text == expected.text
        assert chunks[-2]["choices"][0]["finish_reason"] == reason
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
        assert len({c["id"] for c in chunks}) == 1


def test_token_id_prompts(url, solo):
    ids = solo.bundle.tokenizer.encode(PROMPTS[0]).ids
    assert _complete(url, prompt=ids, max_tokens=8)["choices"][0]["text"] == \
        solo.generate(ids, max_new_tokens=8).text


def test_chat_completions_use_the_template(url, solo):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "one two"}]
    expected = solo.generate(messages, max_new_tokens=TOKENS)
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_completion_tokens": TOKENS,
                                                               "model": "anything", "user": "u1", "n": 1}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["prompt_tokens"] == len(solo.chat_prompt_ids(messages))
    text, chunks = _streamed(url, "/v1/chat/completions", messages=messages, max_tokens=TOKENS)
    assert text == expected.text
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # content parts, as newer clients send them, are the same text
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "one "},
                                                       {"type": "text", "text": "two"}]}]
    text, _ = _streamed(url, "/v1/chat/completions", messages=parts, max_tokens=TOKENS)
    assert text == expected.text


def test_the_openai_client(url, solo):
    """The official client, streaming and not: the same text as Generator.generate."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "the quick"}]
    expected = solo.generate(messages, max_new_tokens=TOKENS).text
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    completion = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=TOKENS, seed=1)
    assert completion.choices[0].text == solo.generate(PROMPTS[2], max_new_tokens=TOKENS).text
    assert [m.id for m in client.models.list()] == ["tiny-llama-chat"]


def test_sampling_fields_reach_the_runtime(url, solo):
    """temperature, top_p, top_k and seed: with a seed, the same draw as Generator.generate's."""
    options = dict(temperature=0.9, top_p=0.95, top_k=20, seed=7)
    expected = solo.generate(PROMPTS[1], max_new_tokens=TOKENS, **options).text
    assert _complete(url, prompt=PROMPTS[1], max_tokens=TOKENS, **options)["choices"][0]["text"] == expected


def test_stop_sequences(url, solo):
    expected = solo.generate(PROMPTS[0], max_new_tokens=TOKENS).text
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]
    cut = expected[:expected.find(stop)]
    body = _complete(url, prompt=PROMPTS[0], max_tokens=TOKENS, stop=[stop, "never appears"])
    assert body["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    text, chunks = _streamed(url, "/v1/completions", prompt=PROMPTS[0], max_tokens=TOKENS, stop=stop)
    assert text == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_each_get_their_solo_answer(url, solo):
    expected = {p: solo.generate(p, max_new_tokens=TOKENS).text for p in PROMPTS}
    results: dict[str, str] = {}

    def ask(prompt: str, stream: bool) -> None:
        if stream:
            results[prompt] = _streamed(url, "/v1/completions", prompt=prompt, max_tokens=TOKENS)[0]
        else:
            results[prompt] = _complete(url, prompt=prompt, max_tokens=TOKENS)["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(p, k % 2 == 0)) for k, p in enumerate(PROMPTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected


def test_the_model_list_and_health(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama-chat"
    assert models["data"][0]["object"] == "model"
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert _error(httpx.get(f"{url}/v1/nothing"), 404)["code"] == "not_found"
    _error(httpx.get(f"{url}/v1/completions"), 405)


def test_stop_text_holds_back_what_may_begin_a_stop_sequence():
    stops = StopText(("END",))
    assert [stops.feed(p) for p in ("abcE", "N", "x")] == ["abc", "", "ENx"] and not stops.stopped
    assert stops.feed("yEND z") == "y" and stops.stopped
    earliest = StopText(("b", "xa"))
    assert earliest.feed("qx") == "q" and earliest.feed("ab") == "" and earliest.stopped
    held = StopText(("END",))
    assert held.feed("aEN") == "a" and held.flush() == "EN"


# -- refusals --------------------------------------------------------------------------------------------------------
def test_bad_json_and_bad_fields_are_400s_naming_them(url):
    post = lambda path, **kw: httpx.post(f"{url}{path}", timeout=30, **kw)  # noqa: E731
    assert _error(post("/v1/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    assert _error(post("/v1/chat/completions", content=b"[1, 2]"), 400)["code"] == "invalid_json"
    assert _error(post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400)["code"] == \
        "invalid_json"
    cases = [
        ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"verbose": True}}, "stream_options.verbose"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {}, "prompt"),
    ]
    for path, body, param in cases:
        error = _error(post(path, json=body), 400)
        assert error["param"] == param and param.split(".")[0].split("[")[0] in error["message"], (body, error)
    assert _error(post("/v1/completions", json={"prompt": [1, 10**9]}), 400)["message"].startswith("prompt token ids")
    # harmless fields at their defaults are accepted
    assert _complete(url, prompt="x", max_tokens=2, n=1, presence_penalty=0, logprobs=None, echo=False, user="u")


def test_a_prompt_longer_than_the_context_is_a_400(url, solo):
    context = solo.max_positions
    for path, body in [("/v1/completions", {"prompt": "one two three " * context}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one two " * context}]}),
                       ("/v1/completions", {"prompt": "one", "max_tokens": context})]:
        error = _error(httpx.post(f"{url}{path}", json=body, timeout=30), 400)
        assert error["code"] == "context_length_exceeded" and f"context is {context} tokens" in error["message"]


def test_a_bundle_without_a_chat_template_refuses_chat(llama_bundle):
    with running(create_app(Generator.load(llama_bundle, provider="cpu"))) as base:
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert "no chat template" in _error(response, 400)["message"]


# -- the queue -------------------------------------------------------------------------------------------------------
def test_a_full_queue_is_a_429_and_waiting_requests_get_their_answers(chat_bundle, solo):
    paced = Paced(Generator.load(chat_bundle, provider="cpu"))
    with running(create_app(paced, max_queue=1)) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "one"}], "max_tokens": 8,
                                "stream": True}) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # admitted: the model is held at the gate
            waiting: dict[str, dict] = {}
            thread = threading.Thread(target=lambda: waiting.update(body=_complete(base, prompt=PROMPTS[1],
                                                                                  max_tokens=TOKENS)))
            thread.start()
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/health").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert _error(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"
            paced.gate.set()
            assert _events(lines)[-1] == "[DONE]"
        thread.join(30)
        assert waiting["body"]["choices"][0]["text"] == solo.generate(PROMPTS[1], max_new_tokens=TOKENS).text
        assert _complete(base, prompt="x", max_tokens=2)  # the queue is free again


def test_a_client_that_disconnects_mid_stream_frees_the_model(chat_bundle, solo):
    long = 100
    assert len(solo.generate(PROMPTS[0], max_new_tokens=long).tokens) == long  # no end of sequence before
    paced = Paced(Generator.load(chat_bundle, provider="cpu"), delay=0.05)  # the whole answer would take 5 s
    paced.gate.set()
    with running(create_app(paced, max_queue=0)) as base:
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                          json={"prompt": PROMPTS[0], "max_tokens": long, "stream": True}) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            next(events), next(events)
        start = time.monotonic()
        deadline = start + 10
        while True:  # the next request is served as soon as the worker notices (max_queue 0: a 429 until then)
            answer = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4}, timeout=30)
            if answer.status_code == 200:
                break
            assert answer.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.02)
        assert time.monotonic() - start < 3.0
        assert paced.pieces[0] < long // 2
        assert answer.json()["choices"][0]["text"] == solo.generate(PROMPTS[1], max_new_tokens=4).text


# -- the command -----------------------------------------------------------------------------------------------------
def test_specx_serve_command(chat_bundle):
    """`specx serve` binds 127.0.0.1 by default and answers; the server imports no torch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("import sys; sys.argv = ['specx', 'serve', sys.argv[1], '--port', sys.argv[2]]; "
            "import specx.cli; specx.cli.main()")
    process = subprocess.Popen([sys.executable, "-c", code, str(chat_bundle), str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "specx serve did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "tiny-llama-chat"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "http://127.0.0.1:" in output, output
    check = subprocess.run([sys.executable, "-c", "import sys, specx.server.app, specx.server.engine; "
                            "assert 'torch' not in sys.modules"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_serve_without_the_extra_says_what_to_install(monkeypatch, chat_bundle):
    from typer.testing import CliRunner

    from specx.cli import app

    for name in [n for n in sys.modules if n == "starlette" or n.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of any of them fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "starlette", None)
    monkeypatch.delitem(sys.modules, "specx.server.app", raising=False)
    result = CliRunner().invoke(app, ["serve", str(chat_bundle)])
    assert result.exit_code == 1 and "pip install 'specx[serve]'" in result.output


def test_a_mode_the_bundle_lacks_fails_at_start(chat_bundle):
    from typer.testing import CliRunner

    from specx.cli import app

    result = CliRunner().invoke(app, ["serve", str(chat_bundle), "--mode", "speculative"])
    assert result.exit_code == 1 and "needs a bundle with a draft model" in result.output
