"""Sampling responses from a policy, exactly as the policy's distribution says.

Used by PPO rollouts, best-of-N, evaluation and the server. Two things make the samples match the
``softmax(logits / T)`` that PPO differentiates (docs/ppo.md, "The equations": the temperature is part of the policy):

* pure sampling: top-k 0, top-p 1, no repetition penalty, no ``min_new_tokens``, with the model's
  own ``generation_config`` overridden (``generate(do_sample=True)`` otherwise samples with top-k 50);
* stopping: generation stops at the stop token(s); each response is cut after its first stop token,
  which is kept (it is part of the response and of every loss); tokens after it are padding.

``sample_responses`` / ``sample_from_ids`` return decoded ``Sample`` lists; ``generate_batch`` is the
tensor form PPO rollouts use (left-padded queries in, right-padded responses with lengths, stop
flags and optionally the sampler's own log-probs out). Several samples of one prompt share its
prefill (:func:`shared_prompt_cache`): transformers' ``num_return_sequences`` repeats the prompt
before the prefill and so computes it once per sample, which on long prompts is most of the work.
While sampling, the model's own ``generation_config`` is hidden (``neutral_model_generation_config``):
transformers would otherwise fill every option tether leaves unset (min_p, no_repeat_ngram_size...)
from it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tether.data.records import Prompt
from tether.data.templates import pad_token_id, prompt_ids, stop_token_id
from tether.memory import run_fitting_memory
from tether.models.wrappers import strip_peft


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    #: extra token ids that end a response besides the tokenizer's eos token
    extra_stop_token_ids: list[int] = field(default_factory=list)
    #: True: never stop early, every response has exactly ``max_new_tokens`` tokens (throughput
    #: benchmarks only: the sampling distribution is unchanged, but responses are not cut at a stop token)
    fixed_length: bool = False
    #: KV cache of ``generate``: None (dynamic) or "static" (pre-allocated; on CUDA, transformers then
    #: compiles the decoding step; on CPU it simply runs uncompiled)
    cache_implementation: str | None = None


def stop_ids(tokenizer, settings: SamplingSettings) -> list[int]:
    ids = [stop_token_id(tokenizer)] + [int(i) for i in settings.extra_stop_token_ids]
    return list(dict.fromkeys(ids))


def generation_config(tokenizer, settings: SamplingSettings, num_return_sequences: int = 1):
    """A GenerationConfig that samples from ``softmax(logits / T)`` and nothing else.

    Temperature 0 means greedy decoding (used for evaluation only; it is not a policy PPO can train).
    """
    from transformers import GenerationConfig

    greedy = settings.temperature <= 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else float(settings.temperature),
        top_k=None if greedy else int(settings.top_k),  # 0 must be passed explicitly: the default is 50
        top_p=None if greedy else float(settings.top_p),
        repetition_penalty=1.0,
        min_new_tokens=0,
        max_new_tokens=int(settings.max_new_tokens),
        # an empty list (not None, which would inherit the model's eos) disables stopping
        eos_token_id=[] if settings.fixed_length else stop_ids(tokenizer, settings),
        pad_token_id=pad_token_id(tokenizer),
        num_return_sequences=num_return_sequences,
        use_cache=True,
        cache_implementation=settings.cache_implementation,
    )


@contextmanager
def neutral_model_generation_config(model):
    """Hide the model's own ``generation_config`` while sampling.

    ``generate`` fills every field the passed config leaves as None from the model's
    ``generation_config`` (transformers 5), so a model shipped with, say, ``min_p`` or
    ``no_repeat_ngram_size`` would silently change the sampling distribution. During the call the
    model sees a config holding only its special token ids.
    """
    from transformers import GenerationConfig

    inner = strip_peft(model)
    original = getattr(inner, "generation_config", None)
    if original is None:
        yield
        return
    inner.generation_config = GenerationConfig(
        bos_token_id=original.bos_token_id,
        eos_token_id=original.eos_token_id,
        pad_token_id=original.pad_token_id,
        decoder_start_token_id=original.decoder_start_token_id,
    )
    try:
        yield
    finally:
        inner.generation_config = original


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` with every sequence right-aligned (left padding), mask from lengths."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def truncate_after_stop(response: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """Cut a response after its first stop token (kept). Returns ``(tokens, stopped)``."""
    for i, t in enumerate(response):
        if t in stop:
            return response[: i + 1], True
    return response, False


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with the stop token when ``stopped``
    stopped: bool
    text: str  # decoded response without the stop token
    #: ``log softmax(logits / T)`` of each response token, recorded while sampling (``return_logprobs``);
    #: they match a full forward pass to ~1e-6 in fp32, not bitwise
    logprobs: list[float] | None = None


class SampledTokenLogprobs:
    """A ``generate`` logits processor that records ``log softmax(logits / T)`` of each sampled token.

    At each decoding step it gathers the previous step's distribution at the token just sampled (the last
    column of ``input_ids``) and keeps the current step's, so it holds one step's log-probs rather than
    every step's logits (``output_logits``). transformers applies the processors passed to ``generate``
    to the model's float32 logits before its own temperature warper; the scores pass through unchanged.
    """

    def __init__(self, temperature: float):
        if temperature <= 0:
            raise ValueError("log-probs need a sampling temperature > 0 (greedy decoding has no density)")
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def sampled(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs of the tokens ``generate`` returned (``sequences``: its output)."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
            self.previous = None
        return (
            torch.stack(self.steps, dim=1)
            if self.steps
            else sequences.new_zeros((len(sequences), 0), dtype=torch.float)
        )


def prompt_runs(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, run)`` of a batch of queries: the index of the first row of each run of identical
    consecutive rows (same ids, same mask), and for every row the number of its run (an index into ``first``)."""
    same = ((query_ids[1:] == query_ids[:-1]) & (query_mask[1:] == query_mask[:-1])).all(dim=1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=query_ids.device), ~same])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def shares_prompt_cache(model, query_ids: torch.Tensor, query_mask: torch.Tensor) -> bool:
    """Whether :func:`shared_prompt_cache` applies: some row repeats the row before it, the prompt has at
    least two columns (``generate`` feeds the last one), and the model's cache is a ``DynamicCache``
    (transformers' own test; recurrent and custom-cache models are sampled the plain way)."""
    rows, width = query_ids.shape
    if rows < 2 or width < 2:
        return False
    supports = getattr(strip_peft(model), "_supports_default_dynamic_cache", None)
    return len(prompt_runs(query_ids, query_mask)[0]) < rows and (supports is None or bool(supports()))


@torch.no_grad()
def shared_prompt_cache(model, query_ids: torch.Tensor, query_mask: torch.Tensor):
    """The key/value cache of left-padded queries ``[B, P]`` in which consecutive rows repeat prompts (the
    k samples of a prompt, a request for n responses), each distinct run computed once.

    The first row of every run minus its last column goes through the model (position ids
    ``cumsum(mask) − 1``, as ``generate`` numbers them), each row then takes its run's cache
    (``Cache.batch_select_indices``), and ``generate(input_ids=query_ids, attention_mask=query_mask,
    past_key_values=cache)`` feeds only the last prompt column before sampling. Each row's logits are
    those of its own plain prefill to float rounding, so the samples follow the same distribution and
    the same random stream as ``num_return_sequences`` draws (a token can differ only where rounding
    moves it across a boundary of that stream).
    """
    import inspect

    from transformers import DynamicCache

    inner = strip_peft(model)
    first, run = prompt_runs(query_ids, query_mask)
    positions = (query_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    # the prefill only fills the cache: no language-model head over the whole prompt
    accepts = "logits_to_keep" in inspect.signature(inner.forward).parameters
    cache = DynamicCache(config=inner.config.get_text_config(decoder=True))
    model(
        input_ids=query_ids[first, :-1],
        attention_mask=query_mask[first, :-1],
        position_ids=positions[first, :-1],
        past_key_values=cache,
        use_cache=True,
        **({"logits_to_keep": 1} if accepts else {}),
    )
    cache.batch_select_indices(run)
    return cache


@torch.no_grad()
def sample_from_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    settings: SamplingSettings,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    generate_hooks: Callable[[range], dict[str, Any]] | None = None,
    return_logprobs: bool = False,
) -> list[list[Sample]]:
    """Sample ``num_return_sequences`` responses for each tokenised prompt.

    ``batch_size`` prompts per ``generate`` call; after an out-of-memory error the call is retried
    with half as many (:func:`tether.memory.run_fitting_memory`) and the smaller size is kept.
    ``generate_hooks(prompt_indices)``, when given, returns extra ``generate`` keyword arguments
    (a ``streamer``, ``stopping_criteria``) for the call about to sample those prompts; the server
    streams and cancels rows with them. ``return_logprobs`` fills each sample's ``logprobs`` from the
    logits computed while sampling (:class:`SampledTokenLogprobs`); the samples are the same either way.
    """
    from transformers import LogitsProcessorList

    if return_logprobs and settings.temperature <= 0:
        raise ValueError("return_logprobs needs a sampling temperature > 0 (greedy decoding has no density)")
    was_training = model.training
    model.eval()
    stop = set(stop_ids(tokenizer, settings))
    pad_id = pad_token_id(tokenizer)
    # the prompts are repeated here rather than by ``num_return_sequences`` (which repeats them before the
    # prefill): the same rows in the same order, so the same random stream, with the prefill shared
    config = generation_config(tokenizer, settings)
    device = next(model.parameters()).device
    out: list[list[Sample]] = []
    fitted = batch_size
    try:
        starts = range(0, len(prompts), batch_size)
        # a progress bar for long sampling jobs (preference pairs, evaluation, best-of-N)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=len(starts) < 4, leave=False):
            chunk = prompts[start : start + batch_size]

            def generate_rows(rows: int) -> tuple[list[list[int]], list[list[float]]]:
                responses, logprobs = [], []
                for first in range(0, len(chunk), rows):
                    ids, mask = left_pad(chunk[first : first + rows], pad_id)
                    ids = ids.repeat_interleave(num_return_sequences, dim=0).to(device)
                    mask = mask.repeat_interleave(num_return_sequences, dim=0).to(device)
                    hooks = {}
                    if shares_prompt_cache(model, ids, mask):
                        hooks["past_key_values"] = shared_prompt_cache(model, ids, mask)
                    if generate_hooks is not None:
                        hooks |= generate_hooks(range(start + first, start + first + len(chunk[first : first + rows])))
                    recorder = SampledTokenLogprobs(settings.temperature) if return_logprobs else None
                    if recorder is not None:
                        hooks["logits_processor"] = LogitsProcessorList([recorder])
                    with neutral_model_generation_config(model):
                        generated = model.generate(
                            input_ids=ids, attention_mask=mask, generation_config=config, **hooks
                        )
                    responses += generated[:, ids.shape[1] :].tolist()
                    if recorder is not None:
                        logprobs += recorder.sampled(generated).tolist()
                return responses, logprobs

            (responses, logprobs), fitted = run_fitting_memory(
                generate_rows, min(fitted, len(chunk)), "sampling (--batch_size)"
            )
            for i, p in enumerate(chunk):
                group = []
                for j in range(num_return_sequences):
                    row = i * num_return_sequences + j
                    r, stopped = truncate_after_stop(responses[row], stop)
                    text_ids = r[:-1] if stopped else r
                    sample = Sample(p, r, stopped, tokenizer.decode(text_ids, skip_special_tokens=True))
                    if return_logprobs:
                        sample.logprobs = logprobs[row][: len(r)]
                    group.append(sample)
                out.append(group)
    finally:
        model.train(was_training)
    return out


def sample_responses(
    model,
    tokenizer,
    prompts: list[Prompt],
    settings: SamplingSettings,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
) -> list[list[Sample]]:
    """Render prompts with the shared template rule, then sample responses for each."""
    ids = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    return sample_from_ids(model, tokenizer, ids, settings, num_return_sequences, batch_size)


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch ``batch_index`` of a seeded sampling job: the first word of numpy's
    ``SeedSequence([seed, batch_index])`` (well mixed: neighbouring seeds or batches share no stream)."""
    import numpy as np

    if seed < 0:
        raise ValueError(f"--seed {seed}: seeds of sampling jobs must be >= 0")
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_seeded(
    model,
    tokenizer,
    prompts: list[Prompt],
    settings: SamplingSettings,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    *,
    seed: int,
    max_prompt_length: int | None = None,
    return_logprobs: bool = False,
) -> list[list[Sample]]:
    """:func:`sample_responses`, reproducible and shared out over the processes of a launch.

    The prompts are cut, in their order, into fixed batches of ``batch_size``; batch ``b`` is sampled
    in one ``generate`` call right after ``torch.manual_seed(batch_seed(seed, b))``. Each process
    samples a contiguous share of the batches (accelerate's ``split_between_processes``) and
    ``gather_object`` hands every process all groups back in prompt order. The samples therefore
    depend on the prompts, ``seed`` and ``batch_size`` only, never on the number of processes (a
    batch that runs out of memory is sampled in halves, which changes its samples: the price of
    finishing). One seed per batch rather than per prompt keeps batched decoding, which on CPU
    samples several times more responses per second than one prompt per call (benchmarks/README.md).
    ``return_logprobs``: as :func:`sample_from_ids`.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    ids = [prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    batches = [range(start, min(start + batch_size, len(ids))) for start in range(0, len(ids), batch_size)]
    state = PartialState()
    mine: list[tuple[int, list[list[Sample]]]] = []
    with state.split_between_processes(list(range(len(batches)))) as share:
        bar = tqdm(
            share, desc="sampling", unit="batch", disable=len(share) < 4 or not state.is_main_process, leave=False
        )
        for b in bar:
            torch.manual_seed(batch_seed(seed, b))
            chunk = [ids[i] for i in batches[b]]
            groups = sample_from_ids(
                model, tokenizer, chunk, settings, num_return_sequences, len(chunk), return_logprobs=return_logprobs
            )
            mine.append((b, groups))
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    return [group for _, groups in sorted(gathered, key=lambda item: item[0]) for group in groups]


@dataclass
class GeneratedBatch:
    """Responses of one rollout as tensors (on the model's device).

    ``responses`` is ``[B, R]``, right-padded with ``pad_id`` after each response's end; a response
    is cut after its first stop token, which is kept (``lengths`` counts it). ``stopped`` says whether
    the response ended with a stop token (always True with ``fixed_length``, where nothing is cut).
    """

    responses: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    #: log-probabilities of the sampled tokens under the sampling distribution softmax(logits / T), from
    #: the logits ``generate`` computed (KV cache): ``[B, R]`` float32, 0 after each response's end.
    #: Only when asked for (``return_logprobs``); they match a full forward pass to ~1e-6 in fp32, not bitwise.
    logprobs: torch.Tensor | None = None
    #: prompts per ``generate`` call that fitted in memory (the next call starts from it)
    batch_size: int | None = None

    @property
    def mask(self) -> torch.Tensor:
        width = self.responses.shape[1]
        return torch.arange(width, device=self.responses.device).unsqueeze(0) < self.lengths.unsqueeze(1)

    def rows(self, index: slice | torch.Tensor) -> GeneratedBatch:
        """The responses at ``index`` (a slice or a tensor of row indices), as a batch of their own."""
        logprobs = None if self.logprobs is None else self.logprobs[index]
        return GeneratedBatch(self.responses[index], self.lengths[index], self.stopped[index], logprobs)


def cut_at_first_stop(
    responses: torch.Tensor, stop: list[int], pad_id: int, logprobs: torch.Tensor | None = None
) -> GeneratedBatch:
    """Vectorised :func:`truncate_after_stop`: keep each row up to and including its first stop token."""
    width = responses.shape[1]
    is_stop = torch.isin(responses, torch.tensor(stop, device=responses.device))
    stopped = is_stop.any(dim=1)
    first = torch.where(stopped, is_stop.float().argmax(dim=1), torch.full_like(stopped, width - 1, dtype=torch.long))
    lengths = first + 1
    positions = torch.arange(width, device=responses.device).unsqueeze(0)
    real = positions < lengths.unsqueeze(1)
    cut = torch.where(real, responses, torch.full_like(responses, pad_id))
    if logprobs is not None:
        logprobs = torch.where(real, logprobs, torch.zeros_like(logprobs))
    return GeneratedBatch(cut, lengths, stopped, logprobs)


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: SamplingSettings,
    batch_size: int | None = None,
    return_logprobs: bool = False,
) -> GeneratedBatch:
    """Sample one response per left-padded query (``[B, P]`` ids and mask), as tensors.

    The tensor form of :func:`sample_from_ids` for PPO rollouts: the queries are already padded
    and on the model's device, and the result stays there. Generation runs in chunks of
    ``batch_size`` rows (all at once when None), halved after an out-of-memory error; the size that
    fitted is returned as ``batch_size``. ``return_logprobs`` also keeps the log-probability of each
    sampled token under ``softmax(logits / T)`` from the logits computed while sampling.
    """

    def generate_rows(start: int, rows: int, config):
        ids, mask = query_ids[start : start + rows], query_mask[start : start + rows]
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    return generate_in_chunks(
        model, tokenizer, query_ids.shape, settings, batch_size, return_logprobs, lambda size: size, generate_rows
    )


def generate_in_chunks(
    model,
    tokenizer,
    query_shape: torch.Size,
    settings: SamplingSettings,
    batch_size: int | None,
    return_logprobs: bool,
    rows_per_call: Callable[[int], int],
    generate_rows: Callable[[int, int, Any], Any],
) -> GeneratedBatch:
    """The sampling loop :func:`generate_batch` and PPO's grouped sampling share: ``generate_rows(start,
    rows, config)`` (a ``model.generate`` output) over chunks of ``rows_per_call(size)`` of the
    ``[B, P]`` queries, with ``size`` starting at ``batch_size`` (all rows when None) and halved after
    an out-of-memory error; then the responses padded to one width and cut after their first stop
    token (unless ``settings.fixed_length``), with the sampled tokens' log-probs when asked."""
    was_training = model.training
    model.eval()
    stop = stop_ids(tokenizer, settings)
    pad_id = pad_token_id(tokenizer)
    config = generation_config(tokenizer, settings)
    if return_logprobs:
        config.output_logits, config.return_dict_in_generate = True, True
    total, prompt_width = query_shape

    def sample_in_chunks(size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rows = rows_per_call(size)
        chunks, chunk_logprobs = [], []
        for start in range(0, total, rows):
            out = generate_rows(start, rows, config)
            sequences = out.sequences if return_logprobs else out
            sampled = sequences[:, prompt_width:]
            chunks.append(sampled)
            if return_logprobs:
                chunk_logprobs.append(
                    torch.stack(
                        [
                            torch.log_softmax(step.float() / settings.temperature, dim=-1)
                            .gather(-1, sampled[:, t : t + 1])
                            .squeeze(-1)
                            for t, step in enumerate(out.logits)
                        ],
                        dim=1,
                    )
                )
            del out
        return chunks, chunk_logprobs

    try:
        with neutral_model_generation_config(model):
            (chunks, chunk_logprobs), used = run_fitting_memory(
                sample_in_chunks, batch_size or total, "sampling (--generation_batch_size)"
            )
    finally:
        model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    responses = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])
    logprobs = (
        torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunk_logprobs])
        if return_logprobs
        else None
    )
    if settings.fixed_length:
        n = responses.shape[0]
        generated = GeneratedBatch(
            responses,
            torch.full((n,), width, dtype=torch.long, device=responses.device),
            torch.ones(n, dtype=torch.bool, device=responses.device),
            logprobs,
        )
    else:
        generated = cut_at_first_stop(responses, stop, pad_id, logprobs)
    generated.batch_size = used
    return generated
