"""Load test of ``tether serve``: the real server on loopback, concurrent valid and invalid requests.

    .venv/bin/python benchmarks/bench_serve.py            # writes benchmarks/results/serve.json

Starts ``tether serve`` in a subprocess on a free 127.0.0.1 port (policy: the embedded
SmolLM2-135M-Instruct; reward model: the same backbone with a fresh scalar head, so best-of-N
costs what it costs with a real reward model), then runs ``--concurrency`` clients for
``--duration`` seconds (and at most ``--max_requests`` requests). Each client sends a random mix
of valid requests (``/generate`` best-of-1/2/4, OpenAI ``/v1/chat/completions`` n = 1/2) and
invalid ones (over the token/n/prompt limits, wrong types, malformed JSON, an oversized body,
no API key, unsupported options). It checks that every valid request is answered (200, the
promised shape), every invalid one gets a 4xx, the server's resident memory stays flat after the
warm-up half, and the server is alive at the end; it reports requests/s and p50/p99 latency.
Traffic goes to 127.0.0.1 only. ``tests/test_serve.py`` runs a few-second version of it.
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

API_KEY = "load-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------


def valid_request(rng: random.Random, max_new_tokens: int) -> tuple[str, str, dict]:
    topic = rng.choice(["the sea", "a cat", "numbers", "rain", "music", "trees", "bread", "stars"])
    if rng.random() < 0.5:
        body = {
            "num_return_sequences": rng.choice([1, 2, 4]),
            "max_new_tokens": rng.randint(1, max_new_tokens),
            "temperature": rng.choice([0.7, 1.0]),
        }
        if rng.random() < 0.5:
            body["prompt"] = f"Say something about {topic}."
        else:
            body["messages"] = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Tell me about {topic}."},
            ]
        return "generate", "/generate", body
    body = {
        "model": "tether",
        "messages": [{"role": "user", "content": f"One line about {topic}."}],
        "n": rng.choice([1, 2]),
        "max_tokens": rng.randint(1, max_new_tokens),
        "temperature": 0.7,
    }
    return "chat", "/v1/chat/completions", body


def invalid_request(rng: random.Random, limits: dict) -> tuple[str, str, object, dict]:
    """``(kind, path, body (dict or raw bytes), extra headers)``: each one must get a 4xx."""
    long_prompt = "word " * (limits["prompt_tokens"] + 50)
    cases = [
        ("too_many_tokens", "/generate", {"prompt": "hi", "max_new_tokens": limits["max_new_tokens"] + 1}, {}),
        (
            "n_too_large",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "n": limits["n"] + 1},
            {},
        ),
        ("prompt_too_long", "/generate", {"prompt": long_prompt}, {}),
        ("missing_prompt", "/generate", {"max_new_tokens": 4}, {}),
        ("wrong_type", "/generate", {"prompt": "hi", "num_return_sequences": "four"}, {}),
        ("bad_role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, {}),
        ("negative_temperature", "/generate", {"prompt": "hi", "temperature": -1}, {}),
        ("logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, {}),
        ("malformed_json", "/generate", b'{"prompt": "hi", ', {}),
        ("not_an_object", "/generate", b"[1, 2, 3]", {}),
        ("oversized_body", "/generate", b'{"prompt": "' + b"x" * (limits["request_bytes"] + 10) + b'"}', {}),
        ("no_api_key", "/generate", {"prompt": "hi"}, {"authorization": ""}),
        (
            "wrong_api_key",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            {"authorization": "Bearer nope"},
        ),
    ]
    return rng.choice(cases)


def check_valid(kind: str, body: dict, data: dict, ranked: bool) -> str | None:
    """None if the response has the promised shape, else what is wrong."""
    if kind == "generate":
        n = body["num_return_sequences"]
        responses = data.get("responses", [])
        if len(responses) != n:
            return f"{len(responses)} responses for n={n}"
        if any(r["num_tokens"] > body["max_new_tokens"] for r in responses):
            return "a response longer than max_new_tokens"
        if ranked:
            scores = [r["score"] for r in responses]
            if None in scores or scores != sorted(scores, reverse=True):
                return "responses not scored best first"
        return None
    choices = data.get("choices", [])
    if data.get("object") != "chat.completion" or len(choices) != body["n"]:
        return "not a chat.completion with n choices"
    if any(c["message"]["role"] != "assistant" or c["finish_reason"] not in ("stop", "length") for c in choices):
        return "bad choice"
    usage = data.get("usage", {})
    if usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0):
        return "usage does not add up"
    return None


async def run_load(
    base_url: str,
    api_key: str,
    duration_s: float,
    concurrency: int,
    max_requests: int,
    invalid_share: float = 0.4,
    max_new_tokens: int = 8,
    server_pid: int | None = None,
    seed: int = 0,
) -> dict:
    """Drive the server; returns counts, failures, latencies and memory samples."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=base_url, timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=concurrency + 2)
    ) as client:
        health = (await client.get("/health")).json()
        limits, ranked = health["limits"], bool(health["ranked"])
        started = time.perf_counter()
        deadline = started + duration_s
        stats = {"valid": 0, "valid_ok": 0, "invalid": 0, "invalid_4xx": 0, "by_kind": {}}
        failures: list[dict] = []
        latencies: list[float] = []
        memory: list[tuple[float, int]] = []
        sent = 0

        def next_slot() -> bool:
            nonlocal sent
            if sent >= max_requests or time.perf_counter() >= deadline:
                return False
            sent += 1
            return True

        async def client_loop(worker: int) -> None:
            rng = random.Random(seed * 1000 + worker)
            while next_slot():
                if rng.random() < invalid_share:
                    kind, path, body, extra = invalid_request(rng, limits)
                    hdrs = {**headers, **extra}
                    hdrs = {k: v for k, v in hdrs.items() if v}
                    stats["invalid"] += 1
                    try:
                        if isinstance(body, bytes):
                            r = await client.post(
                                path, content=body, headers={**hdrs, "content-type": "application/json"}
                            )
                        else:
                            r = await client.post(path, json=body, headers=hdrs)
                        ok = 400 <= r.status_code < 500 and "error" in r.json()
                    except Exception as exc:  # a dropped connection counts as a failure
                        failures.append({"kind": kind, "error": repr(exc)})
                        continue
                    stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
                    if ok:
                        stats["invalid_4xx"] += 1
                    else:
                        failures.append({"kind": kind, "status": r.status_code, "body": r.text[:300]})
                else:
                    kind, path, body = valid_request(rng, max_new_tokens)
                    stats["valid"] += 1
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(path, json=body, headers=headers)
                    except Exception as exc:
                        failures.append({"kind": kind, "error": repr(exc)})
                        continue
                    latency = time.perf_counter() - t0
                    stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
                    problem = check_valid(kind, body, r.json(), ranked) if r.status_code == 200 else None
                    if r.status_code == 200 and problem is None:
                        stats["valid_ok"] += 1
                        latencies.append(latency)
                    else:
                        failures.append(
                            {"kind": kind, "status": r.status_code, "problem": problem, "body": r.text[:300]}
                        )

        async def watch_memory() -> None:
            if server_pid is None:
                return
            import psutil

            process = psutil.Process(server_pid)
            while time.perf_counter() < deadline + 1:
                memory.append((time.perf_counter() - started, process.memory_info().rss))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch_memory())
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        watcher.cancel()
        final = await client.get("/health")
    if server_pid is not None:
        import psutil

        memory.append((elapsed, psutil.Process(server_pid).memory_info().rss))
    half = [m for t, m in memory if t >= elapsed / 2] or [m for _, m in memory]
    after_warmup = next((m for t, m in memory if t >= elapsed / 2), memory[-1][1] if memory else None)
    rss_end = memory[-1][1] if memory else None
    return {
        **stats,
        "failures": failures[:20],
        "failure_count": len(failures),
        "seconds": elapsed,
        "requests": stats["valid"] + stats["invalid"],
        "requests_per_s": (stats["valid"] + stats["invalid"]) / elapsed,
        "valid_requests_per_s": stats["valid_ok"] / elapsed,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies) if latencies else None,
        "rss_mb_start": memory[0][1] / 2**20 if memory else None,
        "rss_mb_after_warmup": after_warmup / 2**20 if after_warmup else None,
        "rss_mb_end": rss_end / 2**20 if rss_end else None,
        "rss_mb_max_second_half": max(half) / 2**20 if half else None,
        "server_alive": final.status_code == 200,
        "server_stats": final.json().get("stats"),
    }


def memory_stable(result: dict, tolerance_mb: float = 64.0, tolerance_share: float = 0.10) -> bool:
    """RSS growth over the second half of the run within max(tolerance_mb, tolerance_share·RSS)."""
    base = result["rss_mb_after_warmup"]
    if base is None:
        return True
    return result["rss_mb_max_second_half"] - base <= max(tolerance_mb, tolerance_share * base)


# --------------------------------------------------------------------------------------------
# the server process
# --------------------------------------------------------------------------------------------


class ServerProcess:
    """``tether serve`` in a subprocess on a free loopback port; stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, args: list[str], log_path: Path, api_key: str = API_KEY, startup_timeout: float = 300.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TETHER_API_KEY=api_key)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tether.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log_level",
                "warning",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tether serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tether serve did not start within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="policy folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--reward_model",
        default=None,
        help="reward model folder (default: the policy's backbone with a fresh scalar head)",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_requests", type=int, default=3000)
    parser.add_argument("--invalid_share", type=float, default=0.4)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="largest max_new_tokens of valid requests")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="server torch threads (1 on a busy shared machine: with more, OpenMP threads stall waiting on each other)",
    )
    parser.add_argument("--output", default=str(HERE / "results" / "serve.json"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from tether.models.loading import ensure_embedded_model

    model = args.model or str(ensure_embedded_model())
    reward_model = args.reward_model or model
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    log = Path(args.output).with_suffix(".server.log")
    serve_args = [
        "--model_name_or_path",
        model,
        "--reward_model_name_or_path",
        reward_model,
        "--max_new_tokens_limit",
        "64",
        "--max_n",
        "8",
        "--max_prompt_tokens",
        "512",
        "--max_batch_sequences",
        "32",
        "--batch_wait_ms",
        "5",
        "--use_cpu",
        "true",
        "--num_threads",
        str(args.num_threads),
    ]
    with ServerProcess(serve_args, log) as server:
        result = asyncio.run(
            run_load(
                server.base_url,
                API_KEY,
                args.duration,
                args.concurrency,
                args.max_requests,
                args.invalid_share,
                args.max_new_tokens,
                server.process.pid,
            )
        )
        alive = server.process.poll() is None
    log.unlink(missing_ok=True)
    result.update(
        {
            "benchmark": "serve",
            "date": dt.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "command": "benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
            "settings": {
                "policy": "SmolLM2-135M-Instruct" if args.model is None else args.model,
                "reward_model": "SmolLM2-135M backbone + fresh scalar head"
                if args.reward_model is None
                else args.reward_model,
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "invalid_share": args.invalid_share,
                "max_new_tokens": args.max_new_tokens,
                "max_batch_sequences": 32,
                "batch_wait_ms": 5,
                "server_torch_threads": args.num_threads,
            },
            "every_valid_answered": result["valid_ok"] == result["valid"],
            "every_invalid_4xx": result["invalid_4xx"] == result["invalid"],
            "memory_stable": memory_stable(result),
            "no_crash": alive and result["server_alive"],
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "note": "Shared 2-core CPU machine with other jobs running; latencies include queueing behind the "
            "dynamic batcher. No peer: this is a robustness/load test, not a comparison.",
        }
    )
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "requests",
        "valid",
        "valid_ok",
        "invalid",
        "invalid_4xx",
        "requests_per_s",
        "valid_requests_per_s",
        "latency_p50_s",
        "latency_p99_s",
        "rss_mb_after_warmup",
        "rss_mb_end",
        "every_valid_answered",
        "every_invalid_4xx",
        "memory_stable",
        "no_crash",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if not (result["every_valid_answered"] and result["every_invalid_4xx"] and result["no_crash"]):
        print(json.dumps(result["failures"], indent=2))
        sys.exit(1)


if __name__ == "__main__":
    main()
