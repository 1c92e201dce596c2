"""Best-of-N entries and the best-of-N curve computed from the base policy's evaluation samples."""

from __future__ import annotations

import pytest
import torch

from tether.evaluation import evaluate as E
from tether.models import scoring
from tether.sampling import bon_kl_bound


def test_best_of_n_picks_hand_computed():
    # two prompts, 4 samples each; raw scores and texts chosen to exercise ties and empty texts
    scores = [0.5, 2.0, 2.0, -1.0, 3.0, 1.0, 0.0, 0.0]
    texts = ["a", "b", "c", "d", "  ", "e", "", ""]
    # N = 4: prompt 0 -> the tie 2.0/2.0 goes to the earlier sample (1); prompt 1 -> 3.0 is blank text, so 1.0 (5)
    assert E.best_of_n_picks(scores, texts, 4, 4) == [1, 5]
    # N = 2: blocks (0,1) (2,3) (4,5) (6,7); the last block is all empty: its top one, the earlier of a tie (6)
    assert E.best_of_n_picks(scores, texts, 4, 2) == [1, 2, 5, 6]
    # N = 3: one block of 3 per prompt, the 4th sample serves no pick
    assert E.best_of_n_picks(scores, texts, 4, 3) == [1, 5]
    assert E.best_of_n_picks(scores, texts, 4, 1) == list(range(8))
    with pytest.raises(ValueError, match="N must be in"):
        E.best_of_n_picks(scores, texts, 4, 5)
    with pytest.raises(ValueError, match="not 3 per prompt"):
        E.best_of_n_picks(scores, texts, 3, 2)


def _hand_pick(block):
    """The reward model's favourite of a block of rows: highest reward, earliest on ties, non-empty text first."""
    candidates = [r for r in block if r["response"].strip()] or block
    return max(candidates, key=lambda r: r["reward"])  # max keeps the first of equal rewards


class _Counted:
    """Counts a model's ``generate`` calls and the rows they sampled (the model still does the work)."""

    def __init__(self, model):
        self.calls, self.rows, original = 0, 0, model.generate

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls += 1
            self.rows += (out.sequences if hasattr(out, "sequences") else out).shape[0]
            return out

        model.generate = generate


@pytest.fixture(scope="module")
def reused(tiny_model_dir, tiny_rm_dir, tokenizer, annotator):
    """Two policies (the second one moved), 4 samples per prompt, entries best-of-4 / -2 / -3 from the first,
    the curve N = 1, 2, 4, normalised rewards; generate calls and the responses the reward model read counted."""
    from tether.data.loading import load_prompts
    from tether.models.loading import load_causal_lm, load_scalar_model
    from tether.models.scoring import RewardStats

    sft, moved = load_causal_lm(str(tiny_model_dir)).eval(), load_causal_lm(str(tiny_model_dir)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    counters = {"sft": _Counted(sft), "moved": _Counted(moved)}
    for name, model in (("sft", sft), ("moved", moved)):  # forward passes outside generate (use_cache=False)
        counters[name].forwards = 0

        def count_forward(module, args, kwargs, out, counter=counters[name]):
            counter.forwards += kwargs.get("use_cache") is False

        model.register_forward_hook(count_forward, with_kwargs=True)
    rm = load_scalar_model(str(tiny_rm_dir)).eval()
    # responses the reward model read (a prompt's responses share one row, so rows would not count them)
    scored = {"rows": 0}
    original_score_sequences = scoring.score_sequences

    def counted(model, sequences, *args, **kwargs):
        scored["rows"] += len(sequences) if model is rm else 0
        return original_score_sequences(model, sequences, *args, **kwargs)

    prompts = [p.prompt for p in load_prompts("embedded:demo", "test")[:5]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring, "score_sequences", counted)
        results = E.evaluate_policies(
            {"sft": sft, "moved": moved},
            sft,
            rm,
            tokenizer,
            prompts,
            reward_tokenizer=tokenizer,
            reward_stats=RewardStats(mean=0.25, std=2.0, count=10),
            temperature=1.0,
            max_new_tokens=5,
            samples_per_prompt=4,
            gold=annotator,
            probes=False,
            best_of_n={"bon4": ("sft", 4), "bon2": ("sft", 2), "bon3": ("sft", 3)},
            bon_curve=(1, 2, 4),
            bon_curve_prompts=2,  # ignored: 4 samples per prompt already cover max(N) = 4 on every prompt
            batch_size=2,
            seed=7,
        )
    return results, prompts, counters, scored


def test_best_of_n_entries_pick_from_the_base_policys_rows(reused):
    results, prompts, _, _ = reused
    base = [r for r in results.samples if r["policy"] == "sft"]
    assert len(base) == 4 * len(prompts)
    for name, n in (("bon4", 4), ("bon2", 2), ("bon3", 3)):
        rows = [r for r in results.samples if r["policy"] == name]
        expected = []
        for i in range(len(prompts)):
            mine = [r for r in base if r["prompt_index"] == i]
            expected += [_hand_pick(mine[j * n : (j + 1) * n]) for j in range(4 // n)]
        assert len(rows) == len(expected) == (4 // n) * len(prompts)
        for got, want in zip(rows, expected):
            for key in ("prompt_index", "response", "reward", "gold", "length", "stopped", "words"):
                assert got[key] == want[key], (name, key)
            assert got["kl"] is None
        m = results.metrics[name]
        assert m["samples"] == len(expected)
        assert m["reward/score"] == pytest.approx(sum(r["reward"] for r in expected) / len(expected), abs=1e-12)
        assert m["reward/gold"] == pytest.approx(sum(r["gold"] for r in expected) / len(expected), abs=1e-12)
        assert m["response/length"] == pytest.approx(sum(r["length"] for r in expected) / len(expected))
        assert m["response/stopped"] == pytest.approx(sum(r["stopped"] for r in expected) / len(expected))
        assert m["kl/ref"] is None and m["kl/bon_bound"] == pytest.approx(bon_kl_bound(n))
        # paired by prompt against the first policy: the picks' mean per prompt minus sft's mean per prompt
        diffs = [
            sum(r["gold"] for r in expected if r["prompt_index"] == i) / (4 // n)
            - sum(r["gold"] for r in base if r["prompt_index"] == i) / 4
            for i in range(len(prompts))
        ]
        assert m["gain/gold"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    # the best of all 4 rewards is at least the mean reward, prompt by prompt
    assert results.metrics["bon4"]["reward/score"] >= results.metrics["sft"]["reward/score"]


def test_curve_from_the_base_policys_rows(reused):
    results, prompts, _, _ = reused
    base = [r for r in results.samples if r["policy"] == "sft"]
    by_prompt = [[r for r in base if r["prompt_index"] == i] for i in range(len(prompts))]
    proxy = [r["reward"] for rs in by_prompt for r in rs]
    golds = [r["gold"] for rs in by_prompt for r in rs]
    assert results.bon_curve == E.curve_rows(proxy, golds, 4, (1, 2, 4))
    one, _, four = results.bon_curve
    # by hand: N = 1 is the mean of every sample; N = 4 (all 4 samples) the mean over prompts of the favourite
    assert one["proxy"] == pytest.approx(sum(proxy) / len(proxy)) and one["gold"] == pytest.approx(sum(golds) / 20)
    favourites = [max(rs, key=lambda r: (r["reward"], r["prompt_index"])) for rs in by_prompt]
    assert four["proxy"] == pytest.approx(sum(r["reward"] for r in favourites) / len(prompts))
    assert four["gold"] == pytest.approx(sum(r["gold"] for r in favourites) / len(prompts))
    assert one["prompts"] == len(prompts) and one["samples_per_prompt"] == 4
    assert results.settings["bon_curve"] == {
        "policy": "sft",
        "samples": "evaluation",
        "prompts": len(prompts),
        "samples_per_prompt": 4,
    }


def test_each_policy_is_sampled_and_scored_once(reused):
    results, prompts, counters, scored = reused
    batches = -(-len(prompts) // 2)  # batch_size 2 prompts per generate call
    for name in ("sft", "moved"):
        assert counters[name].calls == batches and counters[name].rows == 4 * len(prompts)
    # the reward model scored each policy's samples once: no best-of-N or curve rescoring
    assert scored["rows"] == 2 * 4 * len(prompts)
    # KL of "moved": its log-probs come from sampling, only the reference (sft) runs forward, 2 responses a
    # pass (a prompt's responses in one segment), plus plain rows once on the first pass to check that layout
    assert counters["moved"].forwards == 0 and counters["sft"].forwards == -(-4 * len(prompts) // 2) + 1
    assert results.metrics["moved"]["kl/ref"] > 0 and results.metrics["sft"]["kl/ref"] == 0.0


def test_recorded_logprobs_match_a_forward_pass(tiny_model_dir, tokenizer):
    """The sampler's log-probs equal the policy's forward pass to 1e-5 per token (fp32), the samples are the
    same with and without recording them, and the KL from them equals the two-forward KL to 1e-4 per response."""
    import dataclasses

    from tether.data.loading import load_prompts
    from tether.data.templates import pad_token_id
    from tether.evaluation.metrics import per_sequence_kl, response_token_logprobs
    from tether.generation import SamplingSettings, sample_seeded
    from tether.models.loading import load_causal_lm

    reference, policy = load_causal_lm(str(tiny_model_dir)).eval(), load_causal_lm(str(tiny_model_dir)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompts = [p.prompt for p in load_prompts("embedded:demo", "test")[:3]]
    settings = SamplingSettings(max_new_tokens=8, temperature=0.8)
    plain = sample_seeded(policy, tokenizer, prompts, settings, 2, 2, seed=1)
    recorded = sample_seeded(policy, tokenizer, prompts, settings, 2, 2, seed=1, return_logprobs=True)
    flat = [s for g in recorded for s in g]
    assert [[dataclasses.replace(s, logprobs=None) for s in g] for g in recorded] == plain
    forward = response_token_logprobs(policy, flat, 0.8, pad_token_id(tokenizer), 4)
    for s, lp in zip(flat, forward, strict=True):
        assert len(s.logprobs) == len(s.response_ids) == len(lp)
        assert s.logprobs == pytest.approx(lp, abs=1e-5)
    two_forward = per_sequence_kl(
        policy, reference, tokenizer, [dataclasses.replace(s, logprobs=None) for s in flat], 0.8
    )
    assert per_sequence_kl(policy, reference, tokenizer, flat, 0.8) == pytest.approx(two_forward, abs=1e-4)
    assert max(abs(v) for v in two_forward) > 1e-2  # the policy has moved: the comparison is not of zeros
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_seeded(policy, tokenizer, prompts, SamplingSettings(4, 0.0), 1, 2, seed=1, return_logprobs=True)


def test_curve_beyond_the_evaluation_samples_samples_the_first_prompts(
    tiny_model_dir, tiny_rm_dir, tokenizer, annotator
):
    """max(N) > samples_per_prompt: the curve is bon_curve()'s on the first bon_curve_prompts prompts, while a
    best-of-N entry with N <= samples_per_prompt still reuses the evaluation samples."""
    from tether.data.loading import load_prompts

    prompts = [p.prompt for p in load_prompts("embedded:demo", "test")[:3]]
    common = dict(gold=annotator, temperature=1.0, max_new_tokens=4, batch_size=8, seed=3)
    results = E.evaluate_policies(
        {"sft": str(tiny_model_dir)},
        None,
        str(tiny_rm_dir),
        tokenizer,
        prompts,
        samples_per_prompt=2,
        probes=False,
        best_of_n={"bon2": ("sft", 2)},
        bon_curve=(1, 2, 4),
        bon_curve_prompts=2,
        **common,
    )
    alone = E.bon_curve(str(tiny_model_dir), tokenizer, str(tiny_rm_dir), prompts[:2], ns=(1, 2, 4), **common)
    for merged, own in zip(results.bon_curve, alone, strict=True):
        assert merged == pytest.approx(own, abs=1e-6)
    assert results.bon_curve[0]["prompts"] == 2 and results.bon_curve[0]["samples_per_prompt"] == 4
    assert results.settings["bon_curve"] == {"policy": "sft", "samples": "extra", "prompts": 2, "samples_per_prompt": 4}
    base = [r for r in results.samples if r["policy"] == "sft"]
    rows = [r for r in results.samples if r["policy"] == "bon2"]
    assert rows == [{**_hand_pick(base[2 * i : 2 * i + 2]), "policy": "bon2", "kl": None} for i in range(len(prompts))]
