"""tether serve: the real server (uvicorn on a free loopback port) answered over HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tether.config import ConfigError
from tether.serve.app import ServeConfig, create_app, cut_at_stop_strings, streamable_prefix

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]


def load_bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ThreadServer:
    """uvicorn serving ``app`` from a thread, on a socket bound to a free 127.0.0.1 port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_rm_dir):
    from tether.models.loading import load_causal_lm, load_scalar_model, load_tokenizer

    return {
        "policy": load_causal_lm(str(tiny_model_dir)).eval(),
        "tokenizer": load_tokenizer(str(tiny_model_dir)),
        "reward_model": load_scalar_model(str(tiny_rm_dir)).eval(),
    }


@pytest.fixture(scope="module")
def server(models, tiny_model_dir, tiny_rm_dir):
    config = ServeConfig(
        model_name_or_path=str(tiny_model_dir),
        reward_model_path=str(tiny_rm_dir),
        api_key=KEY,
        max_new_tokens_limit=16,
        default_max_new_tokens=6,
        max_n=8,
        max_prompt_tokens=64,
        max_request_bytes=20_000,
        max_batch_sequences=32,
        batch_wait_ms=20,
        seed=0,
        use_cpu=True,
    )
    app = create_app(
        config, policy=models["policy"], tokenizer=models["tokenizer"], reward_model=models["reward_model"]
    )
    running = ThreadServer(app)
    yield running
    running.stop()


def rm_score(models, prompt, text) -> float:
    """The reward model's own score of one (prompt, response), unpadded and unbatched."""
    from tether.data.templates import prompt_response_ids
    from tether.models.scoring import token_scores

    ids, _ = prompt_response_ids(models["tokenizer"], prompt, text)
    with torch.no_grad():
        return float(
            token_scores(models["reward_model"], torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1]
        )


def test_best_of_4_returns_4_scored_responses_best_first(server, models):
    r = httpx.post(
        server.url + "/generate",
        headers=AUTH,
        timeout=60,
        json={"prompt": "Name a fruit.", "num_return_sequences": 4, "max_new_tokens": 5, "temperature": 1.0},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["ranked"] is True and len(data["responses"]) == 4
    scores = [x["score"] for x in data["responses"]]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert data["best"] == data["responses"][0]
    for item in data["responses"]:
        assert 1 <= item["num_tokens"] <= 5 and item["finish_reason"] in ("stop", "length")
        assert item["score"] == pytest.approx(rm_score(models, "Name a fruit.", item["text"]), abs=1e-4)
    assert data["usage"]["completion_tokens"] == sum(x["num_tokens"] for x in data["responses"])


def test_chat_completions_has_the_openai_shape_and_ranks_choices(server):
    body = {
        "model": "anything",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "n": 3,
        "max_tokens": 4,
        "temperature": 0.8,
        "user": "ignored-extra-field",
    }
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int) and data["model"] == Path(str(data["model"])).name
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    for choice in data["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    scores = [c["score"] for c in data["choices"]]
    assert scores == sorted(scores, reverse=True)
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] <= 3 * 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == data["model"]


def test_the_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="tether", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3
    )
    assert len(reply.choices) == 2 and all(isinstance(c.message.content, str) for c in reply.choices)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tether", messages=[{"role": "user", "content": "Hi"}]
        )


BAD_REQUESTS = [
    # (path, JSON body or raw bytes, status, the field the error must name)
    ("/generate", {"prompt": "hi", "max_new_tokens": 17}, 422, "max_new_tokens"),
    ("/generate", {"prompt": "hi", "num_return_sequences": 9}, 422, "num_return_sequences"),
    ("/generate", {"prompt": "hi", "num_return_sequences": 0}, 422, "num_return_sequences"),
    ("/generate", {"prompt": "hi", "temperature": -0.5}, 422, "temperature"),
    ("/generate", {"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ("/generate", {"prompt": ""}, 422, "prompt"),
    ("/generate", {"prompt": "word " * 100}, 422, "prompt"),  # over max_prompt_tokens (64)
    ("/generate", {"max_new_tokens": 3}, 422, "prompt"),
    ("/generate", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, "prompt"),
    ("/generate", {"prompt": "hi", "num_return_sequences": "four"}, 422, "num_return_sequences"),
    ("/generate", {"prompt": "hi", "unknown_option": 1}, 422, "unknown_option"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
        "messages[0].content[0].type",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, 422, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 422, "logprobs"),
    ("/generate", {"prompt": "hi", "stream": True, "seed": "x"}, 422, "seed"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
        422,
        "stop",
    ),
    ("/generate", b'{"prompt": "hi",', 400, None),
    ("/generate", b"", 422, None),
    ("/generate", b"[1, 2]", 422, None),
    ("/generate", b'{"prompt": "' + b"x" * 30_000 + b'"}', 413, None),
]


@pytest.mark.parametrize("path, body, status, field", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_naming_the_field(server, path, body, status, field):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={**AUTH, "content-type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if field is not None:
        assert error["param"] == field and field in error["message"]
    if status == 400:
        assert "malformed JSON" in error["message"]


def test_missing_or_wrong_api_key_is_401_and_health_is_open(server):
    body = {"prompt": "hi", "max_new_tokens": 2}
    assert httpx.post(server.url + "/generate", json=body).status_code == 401
    assert httpx.post(server.url + "/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{broken", headers={"content-type": "application/json"}
    )
    assert r.status_code == 401  # the key is checked before the body is even parsed
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(server.url + "/generate", json=body, headers={"X-API-Key": KEY}).status_code == 200
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(server.url + "/openapi.json").json()["paths"].keys() >= {"/generate", "/v1/chat/completions"}


def test_20_concurrent_requests_all_succeed_and_are_batched(server):
    before = httpx.get(server.url + "/health").json()["stats"]

    async def one(client, i):
        if i % 2:
            return await client.post(
                "/generate",
                json={"prompt": f"Request {i}", "num_return_sequences": 1 + i % 3, "max_new_tokens": 1 + i % 6},
            )
        return await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 4}
        )

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    replies = asyncio.run(main())
    assert [r.status_code for r in replies] == [200] * 20
    for i, r in enumerate(replies):
        data = r.json()
        if i % 2:
            assert len(data["responses"]) == 1 + i % 3
            assert all(x["num_tokens"] <= 1 + i % 6 for x in data["responses"])
        else:
            assert len(data["choices"]) == 1
    after = httpx.get(server.url + "/health").json()["stats"]
    assert after["requests"] - before["requests"] == 20
    assert after["batches"] - before["batches"] < 20  # requests that waited together were generated together


def test_without_a_reward_model_n_samples_come_back_unranked(models, tiny_model_dir):
    config = ServeConfig(
        model_name_or_path=str(tiny_model_dir), api_key=None, max_new_tokens_limit=8, max_n=4, use_cpu=True
    )
    running = ThreadServer(create_app(config, policy=models["policy"], tokenizer=models["tokenizer"]))
    try:
        data = httpx.post(
            running.url + "/generate", json={"prompt": "hi", "num_return_sequences": 3, "max_new_tokens": 3}, timeout=60
        ).json()
        assert data["ranked"] is False and data["best"] is None
        assert len(data["responses"]) == 3 and all(x["score"] is None for x in data["responses"])
        one = httpx.post(running.url + "/generate", json={"prompt": "hi", "max_new_tokens": 3}, timeout=60).json()
        assert one["best"] == one["responses"][0]
        # streaming n > 1 without a reward model: the samples stream as they are sampled, unranked
        body = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 4}
        whole = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60).json()
        raw = httpx.post(running.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).content
        chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
        for i, choice in enumerate(whole["choices"]):
            pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i]
            assert len(pieces) > 3 and "".join(pieces) == choice["message"]["content"]
    finally:
        running.stop()


def test_stop_strings_and_config_bounds():
    assert cut_at_stop_strings("hello world. more", [".", "wor"]) == ("hello ", True)
    assert cut_at_stop_strings("hello", ["x"]) == ("hello", False)
    # streaming holds back what may still become a stop string, or an unfinished character
    assert streamable_prefix("hello wo", ["world", "."]) == ("hello ", False)
    assert streamable_prefix("hello w", ["x"]) == ("hello w", False)
    assert streamable_prefix("hello world!", ["world"]) == ("hello ", True)
    assert streamable_prefix("caf\ufffd", []) == ("caf", False)
    assert streamable_prefix("xa\ufffd", ["a\u00e9"]) == ("x", False)  # the unfinished character may be the é
    with pytest.raises(ConfigError):
        ServeConfig(max_n=64, max_batch_sequences=32)
    with pytest.raises(ConfigError):
        ServeConfig(default_max_new_tokens=600, max_new_tokens_limit=512)


def test_tether_serve_under_a_short_mixed_load(tmp_path, tiny_model_dir, tiny_rm_dir):
    """A few seconds of benchmarks/bench_serve.py against `tether serve` started from the command line."""
    bench = load_bench_serve()
    args = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--reward_model_name_or_path",
        str(tiny_rm_dir),
        "--max_new_tokens_limit",
        "16",
        "--max_n",
        "8",
        "--max_prompt_tokens",
        "64",
        "--max_request_bytes",
        "20000",
        "--use_cpu",
        "true",
        "--num_threads",
        "1",
    ]
    with bench.ServerProcess(args, tmp_path / "server.log", api_key="load-key") as server:
        result = asyncio.run(
            bench.run_load(
                server.base_url,
                "load-key",
                duration_s=4.0,
                concurrency=6,
                max_requests=400,
                max_new_tokens=6,
                server_pid=server.process.pid,
            )
        )
        assert server.process.poll() is None, server.log()
    assert result["failure_count"] == 0, json.dumps(result["failures"], indent=2)
    assert result["valid"] > 0 and result["valid_ok"] == result["valid"]
    assert result["invalid"] > 0 and result["invalid_4xx"] == result["invalid"]
    assert result["server_alive"] and bench.memory_stable(result)
    assert server.process.returncode == 0  # SIGINT: a graceful shutdown


def sse_events(raw: bytes) -> list[str]:
    """The ``data`` of each server-sent event; checks that every event is one ``data: ...`` line + a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n") and not text.startswith("\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: ") :] for e in events]


def chat(server, **body):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 12, "temperature": 1.0, **body}
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_openai_client_streams_the_same_text_as_the_non_streaming_reply(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Tell me a story."}]
    for n in (1, 3):  # n = 1 is streamed token by token; n = 3 with the reward model is ranked, then sent
        whole = client.chat.completions.create(
            model="tether", messages=messages, n=n, max_tokens=12, temperature=1.0, seed=11
        )
        chunks = list(
            client.chat.completions.create(
                model="tether",
                messages=messages,
                n=n,
                max_tokens=12,
                temperature=1.0,
                seed=11,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        for i, choice in enumerate(whole.choices):
            deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
            assert deltas[0].delta.role == "assistant"
            assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
            assert [d.finish_reason for d in deltas][-1] == choice.finish_reason
            assert all(d.finish_reason is None for d in deltas[:-1])
            if n == 1:
                assert len(deltas) > 3  # role, several pieces, finish: streamed as sampled
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_stream_framing_on_raw_bytes(server):
    r = chat(server, stream=True, seed=3, n=2)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(f["index"] for f in finals) == [0, 1] and all(f["delta"] == {} for f in finals)
    scores = [f["score"] for f in finals]  # ranked best first, with the reward model's scores
    assert scores == sorted(scores, reverse=True)
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


def test_generate_stream(server):
    body = {"prompt": "Count to ten.", "max_new_tokens": 10, "temperature": 1.0, "seed": 5}
    whole = httpx.post(server.url + "/generate", headers=AUTH, json=body, timeout=60).json()
    r = httpx.post(server.url + "/generate", headers=AUTH, json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    deltas, result = data[:-1], data[-1]
    assert len(deltas) > 1 and all(d["type"] == "delta" and d["index"] == 0 for d in deltas)
    assert result["type"] == "result" and {k: v for k, v in result.items() if k != "type"} == whole
    assert "".join(d["text"] for d in deltas) == whole["best"]["text"]
    # a stop string taken from inside that text: streamed and whole replies are cut at the same place
    text = whole["best"]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = httpx.post(server.url + "/generate", headers=AUTH, json={**body, "stop": stop}, timeout=60).json()
    assert cut["best"]["text"] == text[: text.index(stop)] and cut["best"]["finish_reason"] == "stop"
    raw = httpx.post(server.url + "/generate", headers=AUTH, json={**body, "stop": stop, "stream": True}, timeout=60)
    pieces = [json.loads(e) for e in sse_events(raw.content)[:-1]]
    assert "".join(p["text"] for p in pieces[:-1]) == cut["best"]["text"] and pieces[-1]["best"] == cut["best"]
    # best-of-4 with the reward model: ranked first, so no deltas, only the result
    ranked = sse_events(
        httpx.post(
            server.url + "/generate", headers=AUTH, json={**body, "stream": True, "num_return_sequences": 4}, timeout=60
        ).content
    )
    assert len(ranked) == 2 and json.loads(ranked[0])["type"] == "result"
    assert len(json.loads(ranked[0])["responses"]) == 4


def test_a_bad_streaming_request_is_a_json_error(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 999},
        timeout=60,
    )
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == "max_tokens"


def test_a_client_leaving_mid_stream_leaves_the_server_answering(server):
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 16, "temperature": 1.0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk; then hang up
    time.sleep(0.2)
    reply = chat(server, max_tokens=4).json()
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_client_leaving_a_long_stream_stops_its_generation(models, tiny_model_dir):
    config = ServeConfig(model_name_or_path=str(tiny_model_dir), api_key=None, max_new_tokens_limit=400, use_cpu=True)
    running = ThreadServer(create_app(config, policy=models["policy"], tokenizer=models["tokenizer"]))
    try:
        body = {"prompt": "Go on.", "max_new_tokens": 400, "temperature": 1.0, "stream": True, "seed": 0}
        with httpx.stream("POST", running.url + "/generate", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert json.loads(next(lines)[len("data: ") :])["type"] == "delta"  # tokens are flowing; hang up
        deadline = time.time() + 30
        while httpx.get(running.url + "/health").json()["stats"]["cancelled_rows"] < 1:
            assert time.time() < deadline, "the worker did not stop the abandoned row"
            time.sleep(0.05)
        whole = httpx.post(running.url + "/generate", json={**body, "stream": False}, timeout=60).json()
        assert whole["responses"][0]["num_tokens"] > 1
    finally:
        running.stop()


def test_seed_gives_the_same_text_whatever_else_is_batched(server):
    body = {"messages": [{"role": "user", "content": "Seeded."}], "max_tokens": 12, "temperature": 1.0}

    async def seeded_among_others(seed):
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            others = [
                client.post("/v1/chat/completions", json={**body, "n": 1 + i % 3, "max_tokens": 4 + i})
                for i in range(5)
            ]
            replies = await asyncio.gather(*others, client.post("/v1/chat/completions", json={**body, "seed": seed}))
        assert all(r.status_code == 200 for r in replies)
        return replies[-1].json()["choices"][0]["message"]["content"]

    alone = chat(server, seed=1234).json()["choices"][0]["message"]["content"]
    assert chat(server, seed=1234).json()["choices"][0]["message"]["content"] == alone
    assert asyncio.run(seeded_among_others(1234)) == alone
    assert chat(server, stream=False, seed=1234, n=1).json()["choices"][0]["message"]["content"] == alone
    others = {chat(server, seed=seed).json()["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
    assert alone not in others and len(others) == 3
