"""``tether serve``: a policy (and optionally a reward model) behind HTTP, with best-of-N reranking.

Endpoints
---------
* ``POST /generate``: ``{"prompt" | "messages", "max_new_tokens", "num_return_sequences",
  "temperature", "top_p", "stop", "seed", "stream"}`` → every response with its reward score, best
  first, and the best one.
* ``POST /v1/chat/completions``: OpenAI-compatible (``messages``, ``n``, ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``,
  ``stream_options``), so existing clients work unchanged. With a reward model the ``n`` choices
  come best first and each carries its ``score``.
* ``GET /v1/models``, ``GET /health``, and FastAPI's OpenAPI page (``/docs``, ``/openapi.json``).

Without a reward model best-of-N is impossible: ``n > 1`` then returns n independent samples in
sampling order, unranked, with ``score: null`` (as OpenAI's ``n`` does), and ``/generate`` says
``"ranked": false`` and gives ``best: null``.

Streaming (``stream: true``): server-sent events, ``data: {json}\n\n`` each, ending with
``data: [DONE]\n\n``. The chat endpoint sends OpenAI's ``chat.completion.chunk`` objects (a role
delta per choice, content deltas as tokens are sampled, a last chunk per choice with ``delta: {}``,
``finish_reason`` and ``score``, and a usage chunk with ``stream_options.include_usage``);
``/generate`` sends ``{"type": "delta", "index", "text"}`` then ``{"type": "result", ...}`` (the
non-streaming body). Tokens reach the stream from a transformers streamer inside the worker's
batched ``generate`` (:class:`RowStream`); text that may still turn into a stop string is held
back, so the pieces add up to exactly the non-streaming text. Best-of-n with a reward model
(``n > 1``) ranks all samples before sending anything, then sends each choice whole; without one,
the n samples stream unranked. A client that disconnects cancels its rows (a stopping criterion),
and the worker never waits for a reader. Validation errors stay JSON responses.

Seeds: a request with ``seed`` is sampled in a ``generate`` call of its own from an RNG seeded with
it (the global RNG is restored after), so its text does not depend on what else is queued.

Bad input never reaches the model and never gives a 500: limits come from the config
(``--max_new_tokens_limit``, ``--max_n``, ``--max_prompt_tokens``, ``--max_request_bytes``) and
break a request with a 4xx whose JSON names the field, in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` (plus FastAPI's ``detail`` list for
validation errors): 400 for malformed JSON, 413 for an oversized body, 422 for a field out of
bounds or of the wrong type, 401 without the API key (``--api_key`` or ``$TETHER_API_KEY``; sent as
``Authorization: Bearer KEY`` as OpenAI clients do, or ``X-API-Key``), 503 when the queue is full.

Concurrency: the models run on one worker thread only. Requests wait in a queue; the worker
takes the first, then gathers whatever else arrives within ``--batch_wait_ms`` up to
``--max_batch_sequences`` sequences, and generates them in one batched ``generate`` call per
(temperature, top_p) (dynamic batching). A request asking for fewer new tokens than its batch
gets its samples cut at its own limit, which is exactly a sample with that limit.
"""

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tether.config import EMBEDDED_MODEL, ConfigError, ModelLoadingArguments
from tether.data.records import Message, Prompt

logger = logging.getLogger(__name__)

API_KEY_ENV = "TETHER_API_KEY"


@dataclass
class ServeConfig(ModelLoadingArguments):
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "The policy to serve: hub id, local folder (full model or PEFT adapter) or the embedded default."
        },
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--reward_model_name_or_path", "--reward_model"],
            "help": "Reward model that scores and ranks the samples (enables best-of-N). Optional.",
        },
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model name reported to clients (default: the policy folder's name)."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0 for all)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"Require this key (Authorization: Bearer KEY). Default: ${API_KEY_ENV} if set, else no key."
        },
    )
    max_new_tokens_limit: int = field(
        default=512, metadata={"help": "Largest max_new_tokens / max_tokens a request may ask."}
    )
    default_max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "max_new_tokens when a request gives none (default: 128 or --max_new_tokens_limit if lower)."
        },
    )
    max_n: int = field(default=16, metadata={"help": "Largest num_return_sequences / n (best-of-N) a request may ask."})
    max_prompt_tokens: int = field(
        default=2048, metadata={"help": "Longest prompt (after the chat template), in tokens."}
    )
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "Largest request body, in bytes."})
    default_temperature: float = field(default=0.7, metadata={"help": "Temperature when a request gives none."})
    max_batch_sequences: int = field(
        default=32, metadata={"help": "Dynamic batching: most sequences generated together in one call."}
    )
    batch_wait_ms: float = field(
        default=5.0,
        metadata={"help": "Dynamic batching: how long the worker waits for more requests after the first one."},
    )
    max_queue: int = field(default=256, metadata={"help": "Requests waiting beyond this are refused with 503."})
    reward_batch_size: int = field(default=32, metadata={"help": "Sequences per reward-model forward pass."})
    seed: int | None = field(default=None, metadata={"help": "Seed the sampler once at start (reproducible runs)."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is available."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for the models (torch.set_num_threads). On a machine shared with other busy "
            "processes, 1 avoids OpenMP threads waiting on each other (or set OMP_WAIT_POLICY=PASSIVE)."
        },
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn log level."})

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.default_max_new_tokens is None:
            self.default_max_new_tokens = min(128, self.max_new_tokens_limit)
        checks = {
            "max_new_tokens_limit": self.max_new_tokens_limit,
            "max_n": self.max_n,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_batch_sequences": self.max_batch_sequences,
            "max_queue": self.max_queue,
            "reward_batch_size": self.reward_batch_size,
            "max_request_bytes": self.max_request_bytes,
            "default_max_new_tokens": self.default_max_new_tokens,
        }
        for name, value in checks.items():
            if value < 1:
                raise ConfigError(f"--{name} {value}: must be >= 1")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(
                f"--default_max_new_tokens {self.default_max_new_tokens} exceeds "
                f"--max_new_tokens_limit {self.max_new_tokens_limit}"
            )
        if self.max_n > self.max_batch_sequences:
            raise ConfigError(f"--max_n {self.max_n} exceeds --max_batch_sequences {self.max_batch_sequences}")
        if not 0 <= self.default_temperature <= 2:
            raise ConfigError(f"--default_temperature {self.default_temperature}: must lie in [0, 2]")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"--num_threads {self.num_threads}: must be >= 1")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch_wait_ms {self.batch_wait_ms}: must be >= 0")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_LABELS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _loc_name(loc) -> str | None:
    """``("body", "messages", 0, "content", "str")`` → ``"messages[0].content"``.

    Pydantic adds the name of each union branch it tried to the location; those are dropped.
    """
    name = ""
    for p in loc:
        if p == "body" and not name:
            continue
        if isinstance(p, int):
            name += f"[{p}]"
        elif p in _UNION_LABELS or "[" in str(p) or str(p).startswith("function-"):
            continue
        else:
            name += ("." if name else "") + str(p)
    return name or None


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Status and body for FastAPI's request validation errors (malformed JSON is a 400)."""
    detail = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]
    # the deepest location is the most specific (for a union it is the branch that came closest)
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        where = first.get("loc", ("body", "?"))[-1]
        message = f"malformed JSON body at character {where}: {ctx.get('error', first.get('msg'))}"
        return 400, {
            "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "json_invalid"},
            "detail": detail,
        }
    param = _loc_name(first.get("loc", ()))
    text = str(first.get("msg", "")).removeprefix("Value error, ")
    if first.get("type") == "missing" and param is None:
        message = "the request needs a JSON object body"
    elif param and not text.startswith(param + ":"):
        message = f"{param}: {text}"
    else:
        message = text
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s), see detail)"
    return 422, {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": str(first.get("type"))},
        "detail": detail,
    }


# --------------------------------------------------------------------------------------------
# The engine: one worker thread owns the models and batches queued requests
# --------------------------------------------------------------------------------------------


class EventSink:
    """Carries a streaming request's events from the worker thread to its event loop.

    The worker never waits on the client: events go into an unbounded ``asyncio.Queue`` through
    ``call_soon_threadsafe``. ``cancelled`` is set when the client goes away; the worker then stops
    generating that request's rows (:class:`CancelledRows`) and sends nothing more.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def put(self, event) -> None:
        if self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def close(self) -> None:
        self.put(None)


@dataclass
class Job:
    prompt: Prompt
    prompt_ids: list[int]
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None = None
    #: set for ``stream: true``; ``live`` streams tokens as they are sampled (off for best-of-n, which ranks first)
    sink: EventSink | None = None
    live: bool = False
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Completion:
    text: str
    score: float | None
    finish_reason: Literal["stop", "length"]
    num_tokens: int
    index: int


class QueueFull(Exception):
    pass


def cut_at_stop_strings(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the first occurrence of any stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def streamable_prefix(text: str, stop: list[str]) -> tuple[str, bool]:
    """The part of a partly generated text that is sure to begin the final text, and whether a stop string occurred.

    The text is cut before the first stop string; without one, a tail that could still grow into a
    stop string, and a trailing U+FFFD (a character whose bytes are not all sampled yet), are held back.
    """
    text, hit = cut_at_stop_strings(text, stop)
    if hit:
        return text, True
    text = text.rstrip("\ufffd")
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


class RowStream:
    """One streamed sample: its tokens so far, and the text already sent (always a prefix of the final text)."""

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def add(self, token: int, tokenizer, stop_ids: set[int]) -> None:
        if self.done:
            return
        if token in stop_ids:
            self.done = True
            return
        self.ids.append(token)
        text, hit = streamable_prefix(tokenizer.decode(self.ids, skip_special_tokens=True), self.job.stop)
        self.done = hit or len(self.ids) >= self.job.max_new_tokens
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.sink.put((self.index, text[len(self.sent) :]))
            self.sent = text


def _row_streamer(rows: list[RowStream | None], tokenizer, stop_ids: set[int]):
    """A transformers streamer (``generate(streamer=...)``) that hands each row's new token to its RowStream.

    ``generate`` calls ``put`` with the prompt ids first, then with one token per row at every step;
    transformers' own ``TextIteratorStreamer`` only takes one row, so batched rows need this.
    """
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        def put(self, value):
            if value.dim() == 1:  # a step (the 2-D first call is the prompt)
                for row, token in zip(rows, value.tolist()):
                    if row is not None:
                        row.add(token, tokenizer, stop_ids)

        def end(self):
            pass

    return RowStreamer()


def _cancelled_rows(sinks: list[EventSink | None], stats: dict[str, int]):
    """Stopping criteria ending the rows whose client disconnected, so a gone stream frees the batch early.

    ``stats["cancelled_rows"]`` counts the rows stopped this way.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelledRows(StoppingCriteria):
        def __init__(self):
            self.stopped = [False] * len(sinks)

        def __call__(self, input_ids, scores, **kwargs):
            gone = [sink is not None and sink.cancelled.is_set() for sink in sinks]
            stats["cancelled_rows"] += sum(g and not s for g, s in zip(gone, self.stopped))
            self.stopped = gone
            return torch.tensor(gone, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CancelledRows()])


class Engine:
    """Runs the policy and reward model on a single worker thread, with dynamic batching."""

    def __init__(
        self,
        policy,
        tokenizer,
        reward_model=None,
        rm_tokenizer=None,
        max_batch_sequences: int = 32,
        batch_wait_s: float = 0.005,
        max_queue: int = 256,
        reward_batch_size: int = 32,
    ):
        self.policy, self.tokenizer = policy, tokenizer
        self.reward_model, self.rm_tokenizer = reward_model, rm_tokenizer or tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.reward_batch_size = reward_batch_size
        self._queue: queue.Queue = queue.Queue()
        self._carry: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.stats = {"requests": 0, "batches": 0, "sequences": 0, "largest_batch": 0, "errors": 0, "cancelled_rows": 0}

    @property
    def ranked(self) -> bool:
        return self.reward_model is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tether-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        while True:  # answer whatever is still waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(APIError(503, "the server is shutting down", type="server_error"))
                if job.sink is not None:
                    job.sink.close()

    def queued(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def submit(self, job: Job) -> concurrent.futures.Future:
        if self._stopping.is_set():
            raise APIError(503, "the server is shutting down", type="server_error")
        if self.queued() >= self.max_queue:
            raise QueueFull()
        self._queue.put(job)
        return job.future

    # -- worker side ----------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Job | None:
        if self._carry:
            return self._carry.popleft()
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _gather(self) -> list[Job]:
        first = self._next(None)
        if first is None:
            return []
        batch, size = [first], first.n
        deadline = time.monotonic() + self.batch_wait_s
        while size < self.max_batch_sequences:
            try:
                job = self._next(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            if size + job.n > self.max_batch_sequences:
                self._carry.appendleft(job)  # first in the next batch
                break
            batch.append(job)
            size += job.n
        return batch

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._gather()
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # skip cancelled requests
            if not live:
                continue
            try:
                results = self.run_batch(live)
            except Exception as exc:  # a bug or an out-of-memory: answer every request of the batch, keep serving
                logger.exception("tether serve: batch of %d request(s) failed", len(live))
                self.stats["errors"] += 1
                for job in live:
                    job.future.set_exception(exc)
                    if job.sink is not None:
                        job.sink.close()
                continue
            for job, result in zip(live, results):
                job.future.set_result(result)
                if job.sink is not None:
                    job.sink.close()

    @torch.inference_mode()
    def run_batch(self, jobs: list[Job]) -> list[list[Completion]]:
        """Generate for every job, score, rank.

        One ``generate`` per (temperature, top-p) group; a job with a ``seed`` gets a ``generate`` of its
        own, sampled from a freshly seeded RNG (the global one is restored afterwards), so its output does
        not depend on what else is batched. Streamed rows get their tokens as they are sampled.
        """
        from tether.generation import SamplingSettings, sample_from_ids, stop_ids

        samples: dict[int, list] = {}
        groups: dict[tuple, list[int]] = {}
        for j, job in enumerate(jobs):
            key = (job.temperature, job.top_p) if job.seed is None else (job.temperature, job.top_p, "seeded", j)
            groups.setdefault(key, []).append(j)
        device = next(self.policy.parameters()).device
        for (temperature, top_p, *seeded), members in groups.items():
            rows = [(jobs[j], i) for j in members for i in range(jobs[j].n)]
            sequences = [job.prompt_ids for job, _ in rows]
            longest = max(jobs[j].max_new_tokens for j in members)
            settings = SamplingSettings(max_new_tokens=longest, temperature=temperature, top_p=top_p)
            streams = [RowStream(job, i) if job.live else None for job, i in rows]
            sinks = [job.sink for job, _ in rows]
            hooks = None
            if any(sink is not None for sink in sinks):
                stop = set(stop_ids(self.tokenizer, settings))

                def hooks(indices: range, streams=streams, sinks=sinks, stop=stop) -> dict[str, Any]:
                    for k in indices:  # a retry after an out-of-memory error samples these rows again
                        if streams[k] is not None:
                            streams[k].ids, streams[k].done = [], False
                    return {
                        "streamer": _row_streamer([streams[k] for k in indices], self.tokenizer, stop),
                        "stopping_criteria": _cancelled_rows([sinks[k] for k in indices], self.stats),
                    }

            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=bool(seeded)):
                if seeded:
                    torch.manual_seed(jobs[members[0]].seed)
                out = sample_from_ids(
                    self.policy,
                    self.tokenizer,
                    sequences,
                    settings,
                    num_return_sequences=1,
                    batch_size=len(sequences),
                    generate_hooks=hooks,
                )
            k = 0
            for j in members:
                samples[j] = [out[k + i][0] for i in range(jobs[j].n)]
                k += jobs[j].n
        completions: list[list[Completion]] = []
        for j, job in enumerate(jobs):
            group = []
            for i, s in enumerate(samples[j]):
                ids, stopped = s.response_ids, s.stopped
                if len(ids) > job.max_new_tokens:  # generated with a longer limit than this request's
                    ids, stopped = ids[: job.max_new_tokens], False
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                else:
                    text = s.text
                text, hit_stop = cut_at_stop_strings(text, job.stop)
                group.append(Completion(text, None, "stop" if (stopped or hit_stop) else "length", len(ids), i))
            completions.append(group)
        if self.reward_model is not None:
            from tether.models.scoring import score_texts

            prompts = [job.prompt for job, group in zip(jobs, completions) for _ in group]
            texts = [c.text for group in completions for c in group]
            scores = score_texts(
                self.reward_model, self.rm_tokenizer, prompts, texts, batch_size=self.reward_batch_size
            ).tolist()
            k = 0
            for group in completions:
                for c in group:
                    c.score = float(scores[k])
                    k += 1
                group.sort(key=lambda c: (-c.score, c.index))  # best first; ties keep sampling order
        size = sum(job.n for job in jobs)
        self.stats["requests"] += len(jobs)
        self.stats["batches"] += 1
        self.stats["sequences"] += size
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
        return completions


# --------------------------------------------------------------------------------------------
# Request and response models (bounds come from the config)
# --------------------------------------------------------------------------------------------


def build_models(config: ServeConfig) -> dict[str, type]:
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    max_new = config.max_new_tokens_limit

    class ContentPart(BaseModel):
        type: Literal["text"] = Field(description="Only text parts are supported.")
        text: str

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[ContentPart]

        def plain(self) -> Message:
            content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
            return Message(role="system" if self.role == "developer" else self.role, content=content)

    Temperature = Field(default=None, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    TopP = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling threshold; 1 = the policy as is.")
    Stop = Field(default=None, description="Up to 4 strings; the text is cut before the first one.")
    Seed = Field(
        default=None,
        ge=-(2**63),
        le=2**64 - 1,
        description="Sample from an RNG seeded with this: the same request and seed give the same text, "
        "whatever else is batched with it.",
    )

    def check_stop(value):
        if value is None:
            return []
        items = [value] if isinstance(value, str) else list(value)
        if len(items) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return items

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str | None = Field(
            default=None,
            min_length=1,
            description="Plain-text prompt (sent as one user turn through the chat template when the model has one).",
        )
        messages: list[ChatMessage] | None = Field(default=None, min_length=1, description="Chat messages.")
        max_new_tokens: int = Field(default=config.default_max_new_tokens, ge=1, le=max_new)
        num_return_sequences: int = Field(
            default=1, ge=1, le=config.max_n, description="N of best-of-N: samples to draw and rank."
        )
        temperature: float | None = Temperature
        top_p: float | None = TopP
        stop: str | list[str] | None = Stop
        seed: int | None = Seed
        stream: bool = Field(
            default=False,
            description="Answer with server-sent events: {type: delta, index, text} pieces as they are sampled "
            "(none for a ranked best-of-n), then {type: result, ...the non-streaming body}, then [DONE].",
        )

        @field_validator("stop")
        @classmethod
        def _stop(cls, value):
            return check_stop(value)

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored
        model: str | None = None
        messages: list[ChatMessage] = Field(min_length=1)
        n: int = Field(
            default=1,
            ge=1,
            le=config.max_n,
            description="Choices to return; with a reward model, best-of-n ranked best first.",
        )
        max_tokens: int | None = Field(default=None, ge=1, le=max_new)
        max_completion_tokens: int | None = Field(default=None, ge=1, le=max_new)
        temperature: float | None = Temperature
        top_p: float | None = TopP
        stop: str | list[str] | None = Stop
        stream: bool | None = Field(
            default=False,
            description="Server-sent chat.completion.chunk events as OpenAI sends them, then [DONE]. With a reward "
            "model and n > 1 the choices are ranked first, then each is sent whole.",
        )
        stream_options: StreamOptions | None = None
        logprobs: bool | None = Field(default=False, description="Not supported: must be false.")
        presence_penalty: float | None = Field(default=0.0, description="Not supported: must be 0.")
        frequency_penalty: float | None = Field(default=0.0, description="Not supported: must be 0.")
        seed: int | None = Seed

        @field_validator("stop")
        @classmethod
        def _stop(cls, value):
            return check_stop(value)

        @field_validator("logprobs")
        @classmethod
        def _off(cls, value):
            if value:
                raise ValueError("logprobs are not supported; send logprobs=false")
            return value

        @field_validator("presence_penalty", "frequency_penalty")
        @classmethod
        def _no_penalty(cls, value):
            if value:
                raise ValueError("not supported (tether samples the policy as it is); send 0")
            return value

    class ResponseItem(BaseModel):
        text: str
        score: float | None = Field(description="Reward-model score (null without a reward model).")
        finish_reason: Literal["stop", "length"]
        num_tokens: int

    class Usage(BaseModel):
        prompt_tokens: int
        completion_tokens: int
        total_tokens: int

    class GenerateResponse(BaseModel):
        model: str
        ranked: bool = Field(description="True when a reward model ranked the responses (best first).")
        responses: list[ResponseItem]
        best: ResponseItem | None = Field(
            description="The top-ranked response (the only one when n = 1 without a "
            "reward model; null for n > 1 without one)."
        )
        usage: Usage

    class AssistantMessage(BaseModel):
        role: Literal["assistant"] = "assistant"
        content: str

    class Choice(BaseModel):
        index: int
        message: AssistantMessage
        finish_reason: Literal["stop", "length"]
        logprobs: None = None
        score: float | None = Field(default=None, description="tether: the reward model's score of this choice.")

    class ChatCompletion(BaseModel):
        id: str
        object: Literal["chat.completion"] = "chat.completion"
        created: int
        model: str
        choices: list[Choice]
        usage: Usage
        system_fingerprint: str | None = None

    return {k: v for k, v in locals().items() if isinstance(v, type) and issubclass(v, BaseModel)}


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


class _AuthAndSizeMiddleware:
    """Pure ASGI middleware: body-size limit and API key, before any parsing."""

    OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect")

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app, self.api_key, self.max_request_bytes = app, api_key, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in self.OPEN_PATHS:
            auth = headers.get("authorization", "")
            supplied = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not supplied or not hmac.compare_digest(supplied.encode(), self.api_key.encode()):
                error = APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                return await self._reply(send, 401, error.body(), {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            error = APIError(
                413,
                f"request body of {length} bytes exceeds the limit of {self.max_request_bytes}",
                code="request_too_large",
            )
            return await self._reply(send, 413, error.body())
        return await self.app(scope, receive, send)

    @staticmethod
    async def _reply(send, status: int, body: dict, extra: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _device(config: ServeConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")


def load_models(config: ServeConfig) -> dict[str, Any]:
    from tether.models.loading import from_pretrained_kwargs, load_causal_lm, load_scalar_model, load_tokenizer

    device = _device(config)
    trust, kwargs = config.trust_remote_code, from_pretrained_kwargs(config)
    out = {
        "tokenizer": load_tokenizer(config.model_name_or_path, trust_remote_code=trust),
        "policy": load_causal_lm(config.model_name_or_path, dtype=config.dtype, **kwargs).to(device).eval(),
    }
    if config.reward_model_path:
        out["rm_tokenizer"] = load_tokenizer(config.reward_model_path, trust_remote_code=trust)
        out["reward_model"] = (
            load_scalar_model(config.reward_model_path, dtype=config.dtype, **kwargs).to(device).eval()
        )
    return out


def create_app(config: ServeConfig | None = None, *, policy=None, tokenizer=None, reward_model=None, rm_tokenizer=None):
    """The FastAPI application. Models are loaded from ``config`` unless given (already loaded)."""
    import copy

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tether.data.templates import prompt_ids

    config = config or ServeConfig()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if policy is None:
        loaded = load_models(config)
        policy, tokenizer = loaded["policy"], loaded["tokenizer"]
        reward_model, rm_tokenizer = loaded.get("reward_model"), loaded.get("rm_tokenizer")
    if tokenizer is None:
        raise ValueError("create_app: a policy needs its tokenizer")
    if config.seed is not None:
        torch.manual_seed(config.seed)
    name = config.served_model_name or os.path.basename(os.path.normpath(str(config.model_name_or_path))) or "tether"
    engine = Engine(
        policy,
        tokenizer,
        reward_model,
        rm_tokenizer,
        config.max_batch_sequences,
        config.batch_wait_ms / 1000.0,
        config.max_queue,
        config.reward_batch_size,
    )
    # The worker thread owns `tokenizer`; requests are tokenised with a copy, one at a time (fast tokenizers
    # must not be used from two threads at once).
    request_tokenizer = copy.deepcopy(tokenizer)
    tokenizer_lock = threading.Lock()
    context_limit = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    models = build_models(config)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    ranked_note = (
        "With a reward model, n > 1 is best-of-n: responses are ranked best first with their scores. "
        "Without one, n > 1 returns n unranked samples with score null."
        if reward_model is None
        else "A reward model is loaded: n > 1 is best-of-n, responses ranked best first with their scores."
    )
    app = FastAPI(
        title="tether",
        version=_version(),
        lifespan=lifespan,
        description="A policy served with best-of-N reranking by a reward model. " + ranked_note,
    )
    app.state.engine = engine
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        status, body = validation_error(list(exc.errors()))
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(
            {**error.body(), "detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):  # a bug: say so in JSON, keep serving
        logger.exception("tether serve: internal error")
        return JSONResponse(
            APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(), status_code=500
        )

    def encode(prompt: Prompt, param: str) -> list[int]:
        with tokenizer_lock:
            try:
                ids = prompt_ids(request_tokenizer, prompt)
            except Exception as exc:  # e.g. a chat template that refuses this sequence of roles
                raise APIError(
                    422,
                    f"{param}: the chat template cannot render this prompt ({exc})",
                    param=param,
                    code="template_error",
                ) from None
        if len(ids) > config.max_prompt_tokens:
            raise APIError(
                422,
                f"{param}: the prompt is {len(ids)} tokens; the limit is {config.max_prompt_tokens}",
                param=param,
                code="prompt_too_long",
            )
        return ids

    async def submit(
        prompt: Prompt,
        param: str,
        n: int,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        stop: list[str],
        seed: int | None,
        stream: bool,
    ) -> tuple[list[int], Job]:
        """Validate and queue a request. Every 4xx is raised here, before any streamed byte."""
        ids = await run_in_threadpool(encode, prompt, param)
        if context_limit is not None and len(ids) + max_new_tokens > context_limit:
            raise APIError(
                422,
                f"max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's context of {context_limit} tokens",
                param="max_new_tokens",
                code="context_length_exceeded",
            )
        job = Job(
            prompt,
            ids,
            n,
            max_new_tokens,
            config.default_temperature if temperature is None else temperature,
            1.0 if top_p is None else top_p,
            stop,
            seed,
            sink=EventSink(asyncio.get_running_loop()) if stream else None,
            live=stream and not (engine.ranked and n > 1),  # best-of-n is ranked before anything is sent
        )
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(
                503,
                f"server busy: {engine.queued()} requests waiting; retry shortly",
                type="server_error",
                code="overloaded",
                headers={"retry-after": "1"},
            ) from None
        return ids, job

    async def job_events(job: Job):
        """The job's streamed pieces ``(sample index, text)``, then its completions; a gone client cancels it."""
        try:
            while (event := await job.sink.queue.get()) is not None:
                yield event
            yield job.future.result()
        finally:
            job.sink.cancelled.set()
            job.future.cancel()

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def error_event(exc: Exception) -> str:
        if not isinstance(exc, APIError):
            logger.error("tether serve: streamed request failed: %r", exc)
            exc = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return sse(exc.body())

    def rest_of(completion: Completion, sent: str) -> str:
        """The final text after what was streamed of it (streamed pieces are always a prefix of it)."""
        if completion.text.startswith(sent):
            return completion.text[len(sent) :]
        logger.warning("tether serve: streamed text is not a prefix of the final text; sending the rest whole")
        return completion.text

    def usage(ids: list[int], completions: list[Completion]) -> dict[str, int]:
        used = sum(c.num_tokens for c in completions)
        return {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}

    def event_stream(events) -> StreamingResponse:
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
        )

    GenerateRequest, GenerateResponse = models["GenerateRequest"], models["GenerateResponse"]
    ChatCompletionRequest, ChatCompletion = models["ChatCompletionRequest"], models["ChatCompletion"]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "reward_model": config.reward_model_path,
            "ranked": engine.ranked,
            "queued": engine.queued(),
            "stats": dict(engine.stats),
            "limits": {
                "max_new_tokens": config.max_new_tokens_limit,
                "n": config.max_n,
                "prompt_tokens": config.max_prompt_tokens,
                "request_bytes": config.max_request_bytes,
                "batch_sequences": config.max_batch_sequences,
            },
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tether"}]}

    def generate_body(ids: list[int], completions: list[Completion]) -> dict[str, Any]:
        items = [
            {"text": c.text, "score": c.score, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens}
            for c in completions
        ]
        best = items[0] if (engine.ranked or len(items) == 1) else None
        return {
            "model": name,
            "ranked": engine.ranked,
            "responses": items,
            "best": best,
            "usage": usage(ids, completions),
        }

    @app.post("/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(request: GenerateRequest):
        """Sample ``num_return_sequences`` responses; with a reward model, score and rank them (best-of-N).

        ``stream: true``: server-sent events ``{"type": "delta", "index", "text"}`` (index: the sample, in
        sampling order) as tokens are sampled, then ``{"type": "result", ...}`` with the non-streaming
        body, then ``[DONE]``. A ranked best-of-N (reward model, n > 1) sends no deltas: only the result.
        """
        if (request.prompt is None) == (request.messages is None):
            raise APIError(
                422,
                "prompt: give exactly one of 'prompt' or 'messages'",
                param="prompt",
                code="missing" if request.prompt is None else "conflict",
            )
        if request.prompt is not None:
            prompt, param = request.prompt, "prompt"
        else:
            prompt, param = tuple(m.plain() for m in request.messages), "messages"
        ids, job = await submit(
            prompt,
            param,
            request.num_return_sequences,
            request.max_new_tokens,
            request.temperature,
            request.top_p,
            request.stop or [],
            request.seed,
            request.stream,
        )
        if not request.stream:
            return generate_body(ids, await asyncio.wrap_future(job.future))

        async def events():
            try:
                async for event in job_events(job):
                    if isinstance(event, tuple):
                        yield sse({"type": "delta", "index": event[0], "text": event[1]})
                    else:
                        yield sse({"type": "result", **generate_body(ids, event)})
            except Exception as exc:
                yield error_event(exc)
                return
            yield "data: [DONE]\n\n"

        return event_stream(events())

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        response_model_exclude_none=False,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(request: ChatCompletionRequest):
        """OpenAI-compatible chat completion; with a reward model the n choices are ranked best first."""
        max_new = request.max_completion_tokens or request.max_tokens or config.default_max_new_tokens
        prompt = tuple(m.plain() for m in request.messages)
        ids, job = await submit(
            prompt,
            "messages",
            request.n,
            max_new,
            request.temperature,
            request.top_p,
            request.stop or [],
            request.seed,
            bool(request.stream),
        )
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            completions = await asyncio.wrap_future(job.future)
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason,
                        "logprobs": None,
                        "score": c.score,
                    }
                    for i, c in enumerate(completions)
                ],
                "usage": usage(ids, completions),
            }
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunk(index: int | None, delta: dict | None = None, finish_reason=None, **extra) -> str:
            choices = [] if index is None else [{"index": index, "delta": delta, "logprobs": None, **extra}]
            if index is not None:
                choices[0]["finish_reason"] = finish_reason
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        async def events():
            sent = [""] * request.n  # by sample index
            for i in range(request.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            try:
                async for event in job_events(job):
                    if isinstance(event, tuple):
                        index, text = event
                        sent[index] += text
                        yield chunk(index, {"content": text})
                    else:
                        completions = event
            except Exception as exc:
                yield error_event(exc)
                return
            # unranked choices are in sampling order (choice i = sample i); ranked ones were sent as nothing yet
            for i, c in enumerate(completions):
                if rest := rest_of(c, sent[c.index]):
                    yield chunk(i, {"content": rest})
                yield chunk(i, {}, c.finish_reason, score=c.score)
            if include_usage:
                yield sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage(ids, completions),
                    }
                )
            yield "data: [DONE]\n\n"

        return event_stream(events())

    # outermost: the key and the body size are checked before anything is parsed
    app.add_middleware(_AuthAndSizeMiddleware, api_key=config.api_key, max_request_bytes=config.max_request_bytes)
    return app


def _version() -> str:
    try:
        from tether import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "0"


def run_serve(config: ServeConfig) -> None:
    """``tether serve``: load the models, then serve with uvicorn until interrupted."""
    import uvicorn

    app = create_app(config)
    logger.info(
        "tether serve: http://%s:%d (docs at /docs)%s",
        config.host,
        config.port,
        "; API key required" if config.api_key else "",
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
