"""Issue 17 item 1: PPO normalises the reward model's score on the distribution it starts from, the
starting policy's own responses at the PPO temperature (Ziegler et al.), not on the reward model's
training pairs; ``tether rm``'s reward_stats.json is only a fallback that says so."""

from __future__ import annotations

import json
import shutil

import torch
from ppo_tiny import one_torch_thread, word_dirs  # noqa: F401  (fixtures)
from test_ppo_trainer import PROMPTS, make_config, trainer

#: what `tether rm` would have measured on its own training pairs: far from the policy's samples
RM_SIDE = {"mean": 100.0, "std": 7.0, "count": 64, "source": "reward model on 32 training pairs"}


def rm_with_training_pair_stats(tmp_path, word_dirs):  # noqa: F811
    folder = tmp_path / "rm"
    shutil.copytree(word_dirs["rm"], folder)
    (folder / "reward_stats.json").write_text(json.dumps(RM_SIDE), encoding="utf-8")
    return str(folder)


@torch.no_grad()
def hand_scores(rm_path: str, tok, rows) -> list[float]:
    """The reward model read at the last token of prompt + response (+ stop), one unpadded row at a time."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
    out = []
    for prompt, response, stopped in rows:
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
        ids += [tok.eos_token_id] if stopped else []
        hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        out.append(float(rm.score(hidden)))
    return out


def test_statistics_are_the_moments_of_the_scores_of_the_starting_policys_responses(tmp_path, word_dirs):  # noqa: F811
    from tether.models.loading import load_tokenizer

    rm = rm_with_training_pair_stats(tmp_path, word_dirs)
    # three responses of one prompt, read as one shared-prompt segment; one response cut at the budget
    rows = [("a b c", "good yes", True), ("a b c", "no no no", False), ("a b c", "x", True), ("s t u", "good", True)]
    responses = tmp_path / "samples.jsonl"
    responses.write_text("".join(json.dumps(dict(zip(("prompt", "response", "stopped"), r))) + "\n" for r in rows))
    config = make_config(tmp_path, word_dirs, reward_model_path=rm, reward_norm_responses=str(responses))
    t = trainer(config)
    scores = torch.tensor(hand_scores(rm, load_tokenizer(str(word_dirs["tokenizer"])), rows), dtype=torch.float64)
    mean, std = scores.mean().item(), ((scores - scores.mean()) ** 2).mean().sqrt().item()
    stats = t.models.reward_stats
    assert abs(stats.mean - mean) < 1e-5 and abs(stats.std - std) < 1e-5 and stats.count == 4
    assert stats.mean != RM_SIDE["mean"]  # today's code: (100, 7) from reward_stats.json
    from tether.models.scoring import _SHARED_PROMPT_EXACT

    assert _SHARED_PROMPT_EXACT[t.models.reward_model]  # the three responses of "a b c" were read in one segment
    result = t.train()
    summary = json.loads((tmp_path / "run" / "ppo_summary.json").read_text())
    record = summary["reward_normalisation"]
    assert record["source"].startswith("starting policy samples") and record["count"] == 4
    assert abs(record["mean"] - mean) < 1e-5 and abs(record["gain"] - 1 / std) < 1e-4
    assert abs(record["bias"] + mean / std) < 1e-4
    assert result.stopped_reason == "completed"
    # more responses in the file than --reward_norm_samples: a seeded sample of that many
    two = trainer(
        make_config(
            tmp_path,
            word_dirs,
            "two",
            reward_model_path=rm,
            reward_norm_responses=str(responses),
            reward_norm_samples=2,
        )
    )
    stats = two.models.reward_stats
    pairs = [scores[[i, j]] for i in range(4) for j in range(i + 1, 4)]
    assert stats.count == 2 and "2 of the 4 responses" in stats.source
    assert any(
        abs(stats.mean - p.mean().item()) < 1e-5 and abs(stats.std - p.std(unbiased=False).item()) < 1e-5 for p in pairs
    )


def test_by_default_ppo_samples_the_starting_policy_without_touching_trainings_random_stream(tmp_path, word_dirs):  # noqa: F811
    rm = rm_with_training_pair_stats(tmp_path, word_dirs)
    sampled = trainer(make_config(tmp_path, word_dirs, "sampled", reward_model_path=rm, reward_norm_samples=12))
    a = sampled.collect_rollout()
    stats = sampled.models.reward_stats
    assert stats.count == 12 and stats.source.startswith("starting policy samples") and stats.std > 0
    assert stats.mean != RM_SIDE["mean"]
    # the first rollout is the one a run without the measurement samples: the RNG was forked
    fallback = trainer(make_config(tmp_path, word_dirs, "fallback", reward_model_path=rm, reward_norm_samples=0))
    b = fallback.collect_rollout()
    again = trainer(make_config(tmp_path, word_dirs, "again", reward_model_path=rm, reward_norm_samples=12))
    assert (again.models.reward_stats.mean, again.models.reward_stats.std) == (stats.mean, stats.std)
    assert torch.equal(a.responses, b.responses) and torch.equal(a.raw_scores, b.raw_scores)
    assert torch.allclose(a.scores[a.stopped], ((a.raw_scores - stats.mean) / stats.std)[a.stopped], atol=1e-5)


def test_reward_model_statistics_are_only_a_fallback_that_says_so(tmp_path, word_dirs, caplog):  # noqa: F811
    rm = rm_with_training_pair_stats(tmp_path, word_dirs)
    with caplog.at_level("WARNING"):
        t = trainer(make_config(tmp_path, word_dirs, reward_model_path=rm, reward_norm_samples=0))
    assert (t.models.reward_stats.mean, t.models.reward_stats.std) == (100.0, 7.0)
    assert "fallback" in t.reward_normalisation["source"] and "fallback" in caplog.text
    t.train()
    summary = json.loads((tmp_path / "run" / "ppo_summary.json").read_text())
    assert "fallback" in summary["reward_normalisation"]["source"] and summary["reward_normalisation"]["mean"] == 100.0
    assert PROMPTS  # the trainer's prompts (imported with make_config)


def test_sampled_statistics_of_a_critic_free_run_come_from_the_reward_model_alone(tmp_path, word_dirs, monkeypatch):  # noqa: F811
    """RLOO (2 responses per prompt) measuring its normalisation on 6 fresh samples, one per prompt: the
    statistics are the moments of the reward model's scores of exactly those samples (each read alone,
    unpadded), no policy or reference pass scores them, and the grouped-rows check is left to the first
    training rollout (whose prompts do repeat)."""
    from transformers import AutoModelForSequenceClassification

    import tether.ppo.reward_scale as reward_scale
    import tether.ppo.rollout as rollout

    rm = rm_with_training_pair_stats(tmp_path, word_dirs)
    sampled, scored = [], []
    sample = reward_scale.sample_responses

    def recording_sample(models, tokenizer, query_ids, query_mask, settings, **kw):
        generated = sample(models, tokenizer, query_ids, query_mask, settings, **kw)
        sampled.append((query_ids, query_mask, generated))
        return generated

    monkeypatch.setattr(reward_scale, "sample_responses", recording_sample)
    score = rollout.score_responses
    monkeypatch.setattr(rollout, "score_responses", lambda *a, **k: scored.append(1) or score(*a, **k))
    config = make_config(
        tmp_path, word_dirs, "rloo", reward_model_path=rm, reward_norm_samples=6, batch_size=4, mini_batch_size=4,
        advantage_estimator="rloo", num_generations=2,
    )  # fmt: skip
    t = trainer(config)
    assert not scored and t.rollout_settings.shared_rows is None  # the reward model alone; nothing checked yet
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    hand = []
    with torch.no_grad():
        for query_ids, query_mask, generated in sampled:
            for q, m, r, n in zip(query_ids, query_mask, generated.responses, generated.lengths):
                ids = torch.cat([q[m.bool()], r[: int(n)]]).unsqueeze(0)
                hand.append(float(model.score(model.model(input_ids=ids).last_hidden_state[0, -1])))
    values = torch.tensor(hand, dtype=torch.float64)
    stats = t.models.reward_stats
    assert stats.count == 6 == len(hand)  # 4 + 2: two chunks of --batch_size
    assert abs(stats.mean - values.mean().item()) < 1e-5
    assert abs(stats.std - values.std(unbiased=False).item()) < 1e-5
    batch = t.collect_rollout()  # the training rollout's 2 responses per prompt share it, once checked
    assert scored and t.rollout_settings.shared_rows is True and batch.group_size == 2
