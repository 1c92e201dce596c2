"""Evaluation metrics: each one a small function with its formula in the docstring.

Text statistics work on *words* (``tether.text.words``: the lowercased ``\\w+`` runs, so
punctuation and whitespace never count as words and "Cat," and "cat" are the same word).
Model-dependent quantities (log-probs, KL) work on token ids.

Over-optimisation (Gao et al. 2022): the x-axis is ``d = √KL`` with KL in nats per response, the
gold reward is recentred to 0 at the starting policy, and two functional forms are fitted by least
squares on this run's points (the coefficients are setup-specific; none are borrowed):

    best-of-N:   R_bon(d) = d (α − β d)          peak at d* = α / (2β)
    RL (PPO):    R_RL(d)  = d (α − β log d)      peak at d* = exp(α/β − 1)
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from tether.data.templates import pad_token_id
from tether.text import ngrams, repetition_rate, words


# ---------------------------------------------------------------------------------------------
# text statistics
# ---------------------------------------------------------------------------------------------
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): ``|unique n-grams| / |n-grams|`` over all responses.

    Pooled over the whole set, so a policy that gives every prompt the same answer scores low even
    when each answer is internally varied (mode collapse). 0.0 when there is no n-gram at all.
    """
    grams: list[tuple[str, ...]] = []
    for t in texts:
        grams.extend(ngrams(words(t), n))
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Mean of :func:`repetition_rate` over responses (0.0 for none)."""
    return float(np.mean([repetition_rate(t, n) for t in texts])) if texts else 0.0


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """``mean``, ``median``, ``std`` (population, ``ddof=0``), ``min`` and ``max`` of the lengths."""
    if len(lengths) == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    a = np.asarray(lengths, dtype=float)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


# ---------------------------------------------------------------------------------------------
# correlation (verbosity bias: does the reward simply pay for length?)
# ---------------------------------------------------------------------------------------------
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """``r = Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²)``; NaN when either side is constant or n < 2."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"pearson: {a.size} x values but {b.size} y values")
    if a.size < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if denom == 0.0:
        return math.nan
    return float((da * db).sum() / denom)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span (``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=float)
    sorted_a = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    return pearson(rankdata(x), rankdata(y))


# ---------------------------------------------------------------------------------------------
# KL between a policy and the reference, from its own samples
# ---------------------------------------------------------------------------------------------
def kl_k1_per_sequence(
    policy_logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]
) -> list[float]:
    """Per response ``Σ_t (log π(a_t|s_t) − log π_ref(a_t|s_t))`` over its tokens (stop token included).

    With responses sampled from π this is an unbiased (k1) estimate of KL(π‖π_ref) per response.
    """
    out = []
    for lp, lr in zip(policy_logprobs, reference_logprobs, strict=True):
        if len(lp) != len(lr):
            raise ValueError(f"a response has {len(lp)} policy log-probs but {len(lr)} reference log-probs")
        out.append(float(sum(a - b for a, b in zip(lp, lr))))
    return out


@torch.no_grad()
def response_token_logprobs(
    model, samples: Sequence, temperature: float, pad_token_id: int, batch_size: int = 8
) -> list[list[float]]:
    """``log softmax(logits/T)`` of each response token given its prompt and the earlier response tokens.

    ``samples`` carry ``prompt_ids`` and ``response_ids`` (``tether.generation.Sample``). T must be
    the temperature the samples were drawn at: the temperature is part of the policy. Samples of the
    same prompt (an evaluation's several samples per prompt) are read as one segment, the prompt once
    and each response a branch that sees the prompt and not the other responses
    (``tether.models.packing``), so a P-token prompt with N responses costs P + Σ|r| tokens instead of
    N·P + Σ|r|; batches hold ``batch_size`` samples of whole prompts. Whether the model gives plain
    rows' log-probs that way is checked once per model on three prompts of the first batch, its
    longest and its two shortest (plain rows from then on if not). Plain rows are right-padded with a
    mask built from lengths, so positions are those of the unpadded text.
    """
    if temperature <= 0:
        raise ValueError("log-probs need a sampling temperature > 0 (greedy decoding has no density)")
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in samples]
    try:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(samples):
            if s.response_ids:  # an empty response has no token to score
                by_prompt.setdefault(tuple(s.prompt_ids), []).append(i)
        if any(len(idx) > 1 for idx in by_prompt.values()):
            order = [i for _, idx in sorted(by_prompt.items(), key=lambda item: len(item[0])) for i in idx]
        else:
            order = sorted((i for idx in by_prompt.values() for i in idx), key=lambda i: _tokens(samples[i]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        shared = len(batches) > 0 and any(len(idx) > 1 for idx in by_prompt.values())
        if shared and model not in _SHARED_PROMPT_LOGPROBS_EXACT:  # once per model, on three prompts of the first batch
            from tether.models.packing import probe_rows

            first = [samples[i] for i in batches[0]]
            rows = probe_rows([s.prompt_ids for s in first], [len(s.response_ids) for s in first])
            probe = [batches[0][j] for j in rows]
            _SHARED_PROMPT_LOGPROBS_EXACT[model], values = _shared_prompt_logprobs_check(
                model, [samples[i] for i in probe], temperature, pad_token_id
            )
            if len(probe) == len(batches[0]):  # the probe was the whole batch
                for i, lp in zip(batches.pop(0), values):
                    out[i] = lp.cpu().tolist()
        shared = shared and _SHARED_PROMPT_LOGPROBS_EXACT[model]
        read = _shared_prompt_logprobs if shared else _plain_logprobs
        for chunk in batches:
            for i, lp in zip(chunk, read(model, [samples[i] for i in chunk], temperature, pad_token_id)):
                out[i] = lp.cpu().tolist()
    finally:
        model.train(was_training)
    return out


def _tokens(sample) -> int:
    return len(sample.prompt_ids) + len(sample.response_ids)


@torch.no_grad()
def _plain_logprobs(model, samples: Sequence, temperature: float, pad: int) -> list[torch.Tensor]:
    """One right-padded row ``prompt + response`` per sample."""
    device = next(model.parameters()).device
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, x in enumerate(seqs):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    out = []
    for row, s in enumerate(samples):
        n_prompt, n_resp = len(s.prompt_ids), len(s.response_ids)
        # logits at position t predict token t + 1
        step_logits = logits[row, n_prompt - 1 : n_prompt - 1 + n_resp].float() / temperature
        targets = ids[row, n_prompt : n_prompt + n_resp].to(step_logits.device)
        out.append(torch.log_softmax(step_logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1))
    return out


@torch.no_grad()
def _shared_prompt_logprobs(model, samples: Sequence, temperature: float, pad: int) -> list[torch.Tensor]:
    """One segment ``[prompt | r_1 | … | r_N]`` per distinct prompt: response k's token t is predicted
    at the prompt's last column for t = 0 and at column ``branch_start(k) + t − 1`` after that."""
    from tether.models.packing import Segment, lay_out_rows, model_attention_mask

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    segments, tokens, members = [], [], []
    for prompt, idx in groups.items():
        responses = [list(samples[i].response_ids) for i in idx]
        segments.append(Segment(len(prompt), tuple(len(r) for r in responses)))
        tokens.append(list(prompt) + [t for r in responses for t in r])
        members.append(idx)
    rows = lay_out_rows(tokens, segments, pad, pack=False)
    device = next(model.parameters()).device
    logits = model(
        input_ids=rows.input_ids.to(device),
        attention_mask=model_attention_mask(model, rows.attention()).to(device),
        position_ids=rows.position_ids.to(device),
        use_cache=False,
    ).logits
    out: list[torch.Tensor | None] = [None] * len(samples)
    for s, (segment, idx) in enumerate(zip(segments, members)):
        base = rows.offset[s]
        for k, i in enumerate(idx):
            start, n = base + segment.branch_start(k), segment.branches[k]
            columns = torch.tensor([base + segment.trunk - 1] + list(range(start, start + n - 1)), device=logits.device)
            step_logits = logits[rows.row[s], columns].float() / temperature
            targets = torch.tensor(samples[i].response_ids, device=logits.device)
            out[i] = torch.log_softmax(step_logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return out


#: per model: whether shared-prompt segments gave plain rows' log-probs on its first batch (weakly held)
_SHARED_PROMPT_LOGPROBS_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shared_prompt_logprobs_check(
    model, samples: Sequence, temperature: float, pad: int
) -> tuple[bool, list[torch.Tensor]]:
    """``(shared segments usable, the log-probs in the layout kept)``: shared-prompt segments vs plain
    rows on these samples (``tether.models.packing.first_exact_layout``: equal up to 1e-3 nats, 5e-2 for
    16-bit weights, or the reason they are not used is logged). FlashAttention ignores 4-D masks, and
    some models rebuild the mask themselves."""
    from tether.models.packing import PLAIN, Layout, first_exact_layout

    computed: dict[Layout, list[torch.Tensor]] = {}

    def logprobs(layout: Layout) -> torch.Tensor:
        read = _shared_prompt_logprobs if layout.share_prompt else _plain_logprobs
        computed[layout] = read(model, samples, temperature, pad)
        return torch.cat(computed[layout])

    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    layout = first_exact_layout([Layout(True, False), PLAIN], logprobs, 0.0, tol, "log-probs")
    return layout.share_prompt, computed[layout]


def per_sequence_kl(
    policy, reference, tokenizer, samples: Sequence, temperature: float, batch_size: int = 8
) -> list[float]:
    """k1 KL estimate of each sample (see :func:`kl_k1_per_sequence`), log-probs at temperature T.

    When every sample carries the log-probs its sampler recorded (``Sample.logprobs``), those are the
    policy's side and only the reference runs a forward pass; they match the policy's forward pass to
    ~1e-6 per token in fp32 (sample with them only where the policy computes in fp32).
    """
    pad = pad_token_id(tokenizer)
    recorded = [getattr(s, "logprobs", None) for s in samples]
    if samples and all(lp is not None for lp in recorded):
        lp = recorded
    else:
        lp = response_token_logprobs(policy, samples, temperature, pad, batch_size)
    lr = response_token_logprobs(reference, samples, temperature, pad, batch_size)
    return kl_k1_per_sequence(lp, lr)


def sequence_kl(policy, reference, tokenizer, samples: Sequence, temperature: float, batch_size: int = 8) -> float:
    """KL(π‖π_ref) in nats per response: ``mean_i Σ_t (log π − log π_ref)`` over the policy's own samples."""
    values = per_sequence_kl(policy, reference, tokenizer, samples, temperature, batch_size)
    return float(np.mean(values)) if values else math.nan


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean paired difference and its standard error, for two policies scored on the same prompts.

        d_i = x_i − y_i,   d̄ = (1/n) Σ d_i,   SE = s_d / √n,   s_d² = Σ (d_i − d̄)² / (n − 1)

    Pairing by prompt removes the prompt-to-prompt spread that two independent means would carry,
    so "PPO beats SFT by d̄ ± SE" is judged on the differences alone. SE is NaN for n < 2.
    """
    x, y = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"{len(x)} values but {len(y)} baseline values")
    if len(x) == 0:
        raise ValueError("no pairs")
    d = x - y
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


# ---------------------------------------------------------------------------------------------
# best-of-N
# ---------------------------------------------------------------------------------------------
def best_of_n_expected(proxy: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected ``value`` of the proxy's favourite among N draws without replacement from m samples.

    With the m samples sorted by proxy score (ascending, ranks i = 1..m), the i-th is the best of a
    uniformly random N-subset with probability ``C(i−1, N−1) / C(m, N)``, so

        E[value of best-of-N] = Σ_i C(i−1, N−1) / C(m, N) · value_(i)

    This uses all m samples for every N ≤ m (lower variance than one draw of N). Ties in the proxy
    are broken by position.
    """
    m = len(proxy)
    if len(values) != m:
        raise ValueError(f"{m} proxy scores but {len(values)} values")
    if not 1 <= n <= m:
        raise ValueError(f"N must be between 1 and the number of samples {m}, got {n}")
    order = sorted(range(m), key=lambda i: (proxy[i], i))
    total = math.comb(m, n)
    return float(sum(math.comb(rank, n - 1) / total * values[i] for rank, i in enumerate(order)))


# ---------------------------------------------------------------------------------------------
# over-optimisation fits (Gao et al. 2022)
# ---------------------------------------------------------------------------------------------
def _lstsq_two(features_a: np.ndarray, features_b: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    design = np.stack([features_a, features_b], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    return float(a), float(b)


def r_bon(d, alpha: float, beta: float):
    """``R_bon(d) = d (α − β d)``."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def _d_log_d(d: np.ndarray) -> np.ndarray:
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)  # d log d → 0 as d → 0


def r_rl(d, alpha: float, beta: float):
    """``R_RL(d) = d (α − β log d)``, with ``R_RL(0) = 0``."""
    d = np.asarray(d, dtype=float)
    return alpha * d - beta * _d_log_d(d)


def _check_points(d: Sequence[float], r: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    d_arr, r_arr = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    if d_arr.shape != r_arr.shape:
        raise ValueError(f"{d_arr.size} d values but {r_arr.size} rewards")
    if np.any(d_arr < 0):
        raise ValueError("d = sqrt(KL) must be >= 0")
    if np.count_nonzero(d_arr > 0) < 2:
        raise ValueError("a fit needs at least two points with d > 0")
    return d_arr, r_arr


def fit_bon(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(α, β)`` of ``R = d (α − β d) = α·d − β·d²`` (linear in α, β; no intercept)."""
    d_arr, r_arr = _check_points(d, r)
    return _lstsq_two(d_arr, -(d_arr**2), r_arr)


def fit_rl(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(α, β)`` of ``R = d (α − β log d) = α·d − β·d log d`` (no intercept)."""
    d_arr, r_arr = _check_points(d, r)
    return _lstsq_two(d_arr, -_d_log_d(d_arr), r_arr)


def bon_peak(alpha: float, beta: float) -> float:
    """``d* = α / (2β)``, the maximum of ``R_bon``; NaN when β ≤ 0 (no maximum)."""
    return alpha / (2 * beta) if beta > 0 else math.nan


def rl_peak(alpha: float, beta: float) -> float:
    """``d* = exp(α/β − 1)``, where ``dR_RL/dd = α − β(log d + 1) = 0``; NaN when β ≤ 0 (no maximum)."""
    if beta <= 0:
        return math.nan
    exponent = alpha / beta - 1
    return math.exp(exponent) if exponent < 700 else math.inf


def recentre(values: Sequence[float], baseline: float) -> list[float]:
    """``R_i − R_start``: gold (or proxy) reward relative to the starting policy, as the fits expect."""
    return [float(v) - float(baseline) for v in values]


def word_count(text: str) -> int:
    return len(words(text))


def most_common_response_share(texts: Sequence[str]) -> float:
    """Share of responses equal to the most common one (after whitespace/case folding); 1.0 = total collapse."""
    if not texts:
        return 0.0
    counts = Counter(" ".join(words(t)) for t in texts)
    return counts.most_common(1)[0][1] / len(texts)
