"""The simulated annotator: the gold function on crafted answers, and BT labelling noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.data.records import Message
from tether.demo import annotator as A


# ---------------------------------------------------------------------------------------------
# pure parts of g
# ---------------------------------------------------------------------------------------------
def test_length_penalty_sweet_spot():
    assert A.length_penalty(5) == 0.0 and A.length_penalty(40) == 0.0 and A.length_penalty(20) == 0.0
    assert A.length_penalty(1) == pytest.approx(math.log(2 / 6) ** 2)  # 1.207
    assert A.length_penalty(0) == pytest.approx(math.log(1 / 6) ** 2)  # 3.210
    assert A.length_penalty(80) == pytest.approx(math.log(81 / 41) ** 2)  # 0.463
    assert A.length_penalty(10_000) == 4.0  # capped
    # not "shorter is always better": 2 words cost more than 60
    assert A.length_penalty(2) > A.length_penalty(60) > 0


def test_copying_rate_and_dangling_endings():
    # 3-grams of the response: "how do i", "do i boil", "i boil water": two occur in the prompt
    assert A.copying_rate("How do I boil an egg?", "How do I boil water") == pytest.approx(2 / 3)
    assert A.copying_rate("anything", "two words") == 0.0
    assert A.ends_dangling("Boil it for six minutes, and")
    assert A.ends_dangling("It contains: eggs,")
    assert A.ends_dangling("Put it in the")
    assert not A.ends_dangling("Cold rain on red leaves")  # a poem line may end without a full stop
    assert not A.ends_dangling("It is done.")
    assert not A.ends_dangling("")
    assert A.is_unfinished("It is done.", stopped=False)
    assert not A.is_unfinished("It is done.", stopped=True)


def test_combine_is_the_documented_formula():
    # 2·0.5 − 1·0.2 − 2·0.1 − 1·0.3 − 1·1 − 1·0
    assert A.combine(0.5, 0.2, 0.1, 0.3, True, False) == pytest.approx(1.0 - 0.2 - 0.2 - 0.3 - 1.0)
    w = A.GoldWeights(relevance=1.0, refusal=3.0)
    assert A.combine(0.5, 0.0, 0.0, 0.0, False, True, w) == pytest.approx(0.5 - 3.0)


def test_preference_probability():
    assert A.preference_probability(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert A.preference_probability(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert A.preference_probability(1000.0, 0.0, 0.1) == 1.0
    assert A.preference_probability(0.0, 1000.0, 0.1) == 0.0
    with pytest.raises(ValueError):
        A.preference_probability(0.0, 0.0, 0.0)


def test_prompt_text_uses_the_last_user_turn():
    chat = (Message("system", "Be brief."), Message("user", "Why is the sky blue?"))
    assert A.prompt_text(chat) == "Why is the sky blue?"
    assert A.prompt_text("plain") == "plain"


# ---------------------------------------------------------------------------------------------
# g on crafted answers
# ---------------------------------------------------------------------------------------------
CASES = {
    "How do I boil an egg so the yolk stays soft?": {
        "good": "Bring water to a boil, lower the egg in gently and cook it for 6 to 7 minutes. Then cool it in "
        "cold water before peeling.",
        "irrelevant": "Paris is the capital of France and is known for the Eiffel Tower and its museums.",
        "repetitive": "Boil the egg. Boil the egg. Boil the egg. Boil the egg. Boil the egg. Boil the egg.",
        "rambling": "Eggs are a wonderful food that people have enjoyed for thousands of years in many cultures. "
        "There are many methods, such as boiling, poaching, frying and baking, and each one brings out "
        "a different texture and flavour, which is why chefs debate the best approach endlessly. When "
        "you boil an egg the timing matters a lot, as do the size of the egg, the altitude and the "
        "temperature of the egg before it goes in. Many people also like to add salt or vinegar to "
        "the water, and some swear by starting in cold water while others never would.",
        "unfinished": "Bring water to a boil, lower the egg in gently and cook it for 6 to 7 minutes, and then",
        "echo": "How do I boil an egg so the yolk stays soft? How do I boil an egg so the yolk stays soft?",
        "refusal": "I'm sorry, but I can't help with that request.",
        "one word": "Boil.",
        "empty": "",
    },
    "What does a CPU do?": {
        "good": "The CPU is the part of a computer that carries out program instructions: it fetches each "
        "instruction from memory, performs the calculation, and moves on to the next.",
        "irrelevant": "Tomatoes grow best in warm weather with plenty of sunlight and regular watering.",
        "repetitive": "A CPU computes. A CPU computes. A CPU computes. A CPU computes. A CPU computes.",
        "unfinished": "The CPU is the part of a computer that carries out program instructions and",
        "refusal": "I cannot provide that information.",
        "one word": "Computing.",
    },
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_gold_prefers_a_relevant_concise_answer(annotator, prompt):
    cases = CASES[prompt]
    names = list(cases)
    scores = dict(zip(names, annotator.scores([prompt] * len(names), [cases[n] for n in names])))
    for name in names:
        if name != "good":
            assert scores["good"] > scores[name] + 0.3, (name, scores)


def test_gold_components_and_stopped_flag(annotator):
    prompt = "What does a CPU do?"
    good = CASES[prompt]["good"]
    rows = annotator.components([prompt, prompt], [good, good], stopped=[True, False])
    assert rows[0]["unfinished"] == 0.0 and rows[1]["unfinished"] == 1.0
    assert rows[0]["gold"] - rows[1]["gold"] == pytest.approx(A.GoldWeights().unfinished)
    assert 0.4 < rows[0]["relevance"] <= 1.0
    assert annotator(prompt, good) == pytest.approx(rows[0]["gold"])
    assert annotator.components([prompt], [""])[0]["relevance"] == 0.0
    with pytest.raises(ValueError):
        annotator.scores([prompt], [good, good])


def test_relevance_is_cosine_of_normalised_mean_pooled_embeddings(annotator):
    e = annotator.embed(["a cat sat on the mat", "a kitten rested on the rug", "a cat sat on the mat"])
    assert e.shape == (3, 384)
    assert torch.linalg.norm(e, dim=-1) == pytest.approx(torch.ones(3), abs=1e-5)
    assert torch.equal(e[0], e[2])  # cached
    assert annotator.relevance(["a cat sat on the mat"], ["a kitten rested on the rug"])[0] == pytest.approx(
        float(e[0] @ e[1]), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------------------------
def test_bradley_terry_labels_match_sigmoid_rate(annotator):
    prompt = "What does a CPU do?"
    a, b = CASES[prompt]["good"], CASES[prompt]["one word"]
    g_a, g_b = annotator.scores([prompt, prompt], [a, b])
    target = 0.75
    tau = (g_a - g_b) / math.log(target / (1 - target))  # σ((g_a − g_b)/τ) = 0.75
    n = 4000
    pairs = A.label_pairs([prompt] * n, [a] * n, [b] * n, tau=tau, seed=123, annotator=annotator)
    assert len(pairs) == n
    rate = sum(p.chosen == a for p in pairs) / n
    # binomial standard error sqrt(.75·.25/4000) = 0.0068; 4 standard errors
    assert abs(rate - target) < 0.028, rate
    # the order of a and b does not matter, only g
    flipped = A.label_pairs([prompt] * n, [b] * n, [a] * n, tau=tau, seed=7, annotator=annotator)
    assert abs(sum(p.chosen == a for p in flipped) / n - target) < 0.028
    # a tiny τ makes the annotator noiseless
    assert all(
        p.chosen == a for p in A.label_pairs([prompt] * 50, [b] * 50, [a] * 50, tau=1e-3, seed=0, annotator=annotator)
    )


def test_label_pairs_is_reproducible_and_skips_ties(annotator):
    prompt = "What does a CPU do?"
    a, b = CASES[prompt]["good"], CASES[prompt]["unfinished"]
    one = A.label_pairs([prompt] * 30, [a] * 30, [b] * 30, tau=2.0, seed=5, annotator=annotator)
    two = A.label_pairs([prompt] * 30, [a] * 30, [b] * 30, tau=2.0, seed=5, annotator=annotator)
    assert [p.chosen for p in one] == [p.chosen for p in two]
    assert all(p.margin is None for p in one)  # the reward model never sees g
    pairs = A.label_pairs([prompt, prompt], [a, a], [a + "  ", b], seed=0, annotator=annotator)
    assert len(pairs) == 1 and {pairs[0].chosen, pairs[0].rejected} == {a, b}
    assert pairs[0].origin == "simulated-annotator:1"
    with pytest.raises(ValueError):
        A.label_pairs([prompt], [a, a], [b], annotator=annotator)


def test_build_preference_dataset_from_a_tiny_policy(annotator, tiny_model_dir, tokenizer, tmp_path):
    from tether.data.loading import load_preferences, load_prompts
    from tether.data.writing import write_preferences
    from tether.generation import SamplingSettings
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    prompts = load_prompts("embedded:demo")[:4]
    pairs = A.build_preference_dataset(
        model,
        tokenizer,
        prompts,
        SamplingSettings(max_new_tokens=6, temperature=1.0),
        tau=0.1,
        seed=0,
        annotator=annotator,
        responses_per_prompt=3,
    )
    assert 1 <= len(pairs) <= 4 * 3  # C(3, 2) pairs per prompt, identical responses skipped
    assert {p.prompt for p in pairs} <= {r.prompt for r in prompts}
    assert all(p.chosen != p.rejected for p in pairs)
    # a 6-token budget cuts most responses: those are marked, and the marks survive the file
    assert any(p.chosen_truncated or p.rejected_truncated for p in pairs)
    path = write_preferences(pairs, tmp_path / "pairs.jsonl")
    assert load_preferences(str(path)) == pairs
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) <= {"prompt", "chosen", "rejected", "chosen_truncated", "rejected_truncated"} for r in rows)
    assert all(r.get("chosen_truncated", False) == p.chosen_truncated for r, p in zip(rows, pairs))


def test_gold_metrics_hook_reads_a_rollout(annotator, tokenizer):
    from tether.ppo.rollout import Rollout

    prompt = "What does a CPU do?"
    good = CASES[prompt]["good"]
    ids = tokenizer(good, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    responses = torch.tensor([ids, ids])
    z = torch.zeros(2, 1)
    rollout = Rollout(
        query_ids=z,
        query_mask=z,
        responses=responses,
        response_mask=torch.ones_like(responses),
        lengths=torch.tensor([len(ids), len(ids)]),
        stopped=torch.tensor([True, False]),
        input_ids=z,
        attention_mask=z,
        position_ids=z,
        logprobs=z,
        ref_logprobs=z,
        values=z,
        kl=z,
        kl_penalty=z,
        raw_scores=z,
        scores=z,
        prompts=[prompt, prompt],
    )
    out = A.gold_metrics_hook(tokenizer, annotator)(rollout)
    texts = rollout.response_texts(tokenizer)
    assert texts[0] == good
    finished, unfinished = annotator.scores([prompt, prompt], texts, [True, False])
    assert finished != unfinished  # the unfinished answer is penalised
    # mean and s/√n: for two scores s = |a − b|/√2, so the standard error is |a − b|/2
    assert out == {
        "reward/gold": pytest.approx((finished + unfinished) / 2),
        "reward/gold_se": pytest.approx(abs(finished - unfinished) / 2),
    }


def test_pairs_of_samples_lists_every_pair_of_each_prompts_samples_in_order():
    from tether.demo.annotator import pairs_of_samples

    prompts, a, b = pairs_of_samples(["p", "q"], [["p0", "p1", "p2"], ["q0", "q1"]])
    assert prompts == ["p", "p", "p", "q"]
    assert list(zip(a, b)) == [("p0", "p1"), ("p0", "p2"), ("p1", "p2"), ("q0", "q1")]
    with pytest.raises(ValueError, match="2 prompts but 1 groups"):
        pairs_of_samples(["p", "q"], [["p0", "p1"]])
