"""--num_generations k with a shared prompt: the k responses of one prompt in one row
[prompt | response 1 | … | response k] with a 4-D mask, and one prefill per prompt for sampling.
Checked against plain [prompt | response] rows on tiny real models: same log-probs, values, scores,
losses and weights after a step."""

from __future__ import annotations

import pytest
import torch
from ppo_tiny import word_dirs, word_tok  # noqa: F401  (fixtures)
from test_ppo_trainer import make_config, trainer

from tether.generation import GeneratedBatch
from tether.models.packing import block_attention, branch_positions
from tether.models.wrappers import strip_peft
from tether.ppo.grouping import generate_groups, group_rows, response_index, take_responses
from tether.ppo.rollout import score_responses, shared_rows_match

PROMPTS = ["a b c", "d e", "yes no", "x y z w"]


def test_grouped_row_mask_positions_and_response_columns_by_hand():
    # one prompt "p0 p1" left-padded to 3 columns, k = 2 responses padded to R = 2: [3 tokens, 1 token]
    query = torch.tensor([[0, 5, 6], [0, 5, 6]])
    query_mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    responses = torch.tensor([[7, 8], [9, 0]])
    response_mask = torch.tensor([[True, True], [True, False]])
    rows = group_rows(query, query_mask, responses, response_mask, 2)
    assert rows.input_ids.tolist() == [[0, 5, 6, 7, 8, 9, 0]]
    assert rows.allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],  # prompt padding: itself only
        [0, 1, 0, 0, 0, 0, 0],  # p0
        [0, 1, 1, 0, 0, 0, 0],  # p1
        [0, 1, 1, 1, 0, 0, 0],  # response 1, token 0: the prompt and itself
        [0, 1, 1, 1, 1, 0, 0],  # response 1, token 1
        [0, 1, 1, 0, 0, 1, 0],  # response 2, token 0: the prompt, not response 1
        [0, 0, 0, 0, 0, 0, 1],  # response 2's padding: itself only
    ]
    # positions restart after the prompt: response 2 starts at 2, like response 1
    assert rows.position_ids.tolist() == [[0, 0, 1, 2, 3, 2, 3]]
    # the logits predicting response token t of segment j, relative to column P − 1 = 2:
    # token 0 of both responses is predicted by the last prompt token (0); then columns 1 and 3
    assert rows.response_index.tolist() == [[[0, 1], [0, 3]]]
    assert response_index(1, 3, 2).tolist() == [[[0, 1], [0, 3], [0, 5]]]
    read_out = torch.arange(5).view(1, 5) * 10  # columns P−1 .. P+kR−1
    assert take_responses(read_out, rows.response_index).tolist() == [[0, 10], [0, 30]]
    assert rows.stop_columns(torch.tensor([2, 1])).tolist() == [[4, 5]]


def test_three_segments_see_only_the_prompt_and_themselves():
    segments = torch.tensor([[0, 0, 1, 2, 2, 3]])
    allowed = block_attention(torch.zeros(1, 6, dtype=torch.long), segments)[0, 0].int()
    assert allowed[5].tolist() == [1, 1, 0, 0, 0, 1] and allowed[4].tolist() == [1, 1, 0, 1, 1, 0]
    assert branch_positions(segments, torch.ones(1, 6, dtype=torch.bool)).tolist() == [[0, 1, 2, 2, 3, 2]]


def _generated(batch) -> GeneratedBatch:
    return GeneratedBatch(batch.responses, batch.lengths, batch.stopped)


@pytest.mark.parametrize("attn,value_head", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_grouped_rows_score_like_plain_rows_with_a_value_model(tmp_path, word_dirs, attn, value_head):
    # GAE with k = 3 responses per prompt: policy, reference, value model (or the value head on the
    # policy's trunk) and reward model all read grouped rows
    config = make_config(
        tmp_path,
        word_dirs,
        num_generations=3,
        batch_size=6,
        mini_batch_size=6,
        attn_implementation=attn,
        value_head_on_policy=value_head,
    )
    t = trainer(config, PROMPTS)
    if value_head:  # it starts at zero, which any read-out position would reproduce
        torch.nn.init.normal_(t.models.policy_and_value.value_head.weight)
    batch = t.collect_rollout()
    assert t.rollout_settings.shared_rows is True and batch.group_size == 3
    assert len(set(map(tuple, batch.query_ids.tolist()))) == 2
    # responses cut to different lengths by hand (the tiny policy rarely stops): padding inside the segments
    lengths = torch.tensor([6, 2, 4, 1, 6, 3])
    cut = GeneratedBatch(
        torch.where(batch.response_mask & (torch.arange(6) < lengths.unsqueeze(1)), batch.responses, 2),
        lengths,
        torch.ones(6, dtype=torch.bool),
    )
    args = (t.models, batch.query_ids, batch.query_mask, cut, t.rollout_settings)
    grouped, plain = score_responses(*args, group_size=3), score_responses(*args)
    assert grouped.group_size == 3 and plain.group_size == 1 and grouped.values is not None
    for name in ("logprobs", "ref_logprobs", "values", "kl", "raw_scores"):
        torch.testing.assert_close(getattr(grouped, name), getattr(plain, name), atol=1e-5, rtol=1e-5, msg=name)
    # and the rollout's own (full-length) responses
    plain = score_responses(t.models, batch.query_ids, batch.query_mask, _generated(batch), t.rollout_settings)
    for name in ("logprobs", "values", "raw_scores"):
        torch.testing.assert_close(getattr(batch, name), getattr(plain, name), atol=1e-5, rtol=1e-5, msg=name)


def test_one_grouped_step_equals_one_plain_step(tmp_path, word_dirs):
    overrides = dict(advantage_estimator="grpo", num_generations=2, batch_size=8, mini_batch_size=8, ppo_epochs=1)
    overrides.update(missing_eos_penalty=None, kl_in_loss=True, init_kl_coef=0.2)
    grouped_trainer = trainer(make_config(tmp_path, word_dirs, "grouped", **overrides), PROMPTS)
    plain_trainer = trainer(make_config(tmp_path, word_dirs, "plain", **overrides), PROMPTS)
    batch = grouped_trainer.collect_rollout()
    assert batch.group_size == 2
    settings = plain_trainer.rollout_settings
    plain = score_responses(plain_trainer.models, batch.query_ids, batch.query_mask, _generated(batch), settings)
    plain.prompts = batch.prompts
    grouped_metrics = grouped_trainer.learn(batch)
    plain_metrics = plain_trainer.learn(plain)
    torch.testing.assert_close(batch.advantages, plain.advantages, atol=1e-5, rtol=1e-5)
    for key in ("loss/policy", "loss/kl", "loss/total", "policy/entropy", "loss/grad_norm"):
        assert grouped_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-6), key
    assert grouped_metrics["loss/grad_norm"] > 0
    for (name, a), (_, b) in zip(
        grouped_trainer.models.policy_and_value.named_parameters(),
        plain_trainer.models.policy_and_value.named_parameters(),
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(
            grouped_trainer.models.policy_and_value.parameters(), trainer_start(tmp_path, word_dirs).parameters()
        )
    ]
    assert max(moved) > 1e-4  # the step did move the weights


def trainer_start(tmp_path, word_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(word_dirs["policy"])


def test_minibatches_of_grouped_rows_hold_whole_groups(tmp_path, word_dirs):
    config = make_config(
        tmp_path, word_dirs, advantage_estimator="rloo", num_generations=2, batch_size=8, mini_batch_size=4
    )
    t = trainer(config, PROMPTS)
    batch = t.collect_rollout()
    t.learn(batch)
    assert batch.group_size == 2 and len(t.update_log) == 2 * 2
    for step in t.update_log:
        rows = step["rows"]
        assert [r // 2 for r in rows[::2]] == [r // 2 for r in rows[1::2]] and all(r % 2 == 0 for r in rows[::2])


def test_sampling_prefills_each_prompt_once_and_its_logprobs_match_the_policy(tmp_path, word_dirs, word_tok):
    t = trainer(make_config(tmp_path, word_dirs, num_generations=4, batch_size=8, mini_batch_size=8), PROMPTS)
    policy = t.models.policy_and_value.policy
    query_ids, query_mask, *_ = _queries(t)
    seen = []
    hook = strip_peft(policy).get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        torch.manual_seed(0)
        generated = generate_groups(
            policy, word_tok, query_ids, query_mask, t.rollout_settings.sampling, 4, return_logprobs=True
        )
    finally:
        hook.remove()
    prompt_width = query_ids.shape[1]
    assert seen[0] == (2, prompt_width - 1)  # the prefill: 2 distinct prompts, not 8 rows
    assert seen[1] == (8, 1)  # then every row continues from the repeated cache with its last prompt token
    assert sum(s[0] * s[1] for s in seen) < 8 * prompt_width + 8 * generated.responses.shape[1]
    rescored = score_responses(t.models, query_ids, query_mask, generated, t.rollout_settings)
    mask = generated.mask
    torch.testing.assert_close(generated.logprobs[mask], rescored.logprobs[mask], atol=1e-5, rtol=1e-5)
    # the four samples of a prompt differ (they are samples, not one copied four times)
    assert len({tuple(r) for r in generated.responses[:4].tolist()}) > 1


def _queries(t):
    from tether.data.templates import pad_token_id
    from tether.generation import left_pad

    _, token_ids, _ = t.prompts.next_batch(t.state, 0, t.geometry.local_batch)
    return (*left_pad(token_ids, pad_token_id(t.tokenizer)),)


def test_an_attention_that_ignores_4d_masks_falls_back_to_plain_rows_with_the_reason(tmp_path, word_dirs):
    config = make_config(tmp_path, word_dirs, num_generations=2, batch_size=4, mini_batch_size=4)
    t = trainer(config, PROMPTS)
    batch = t.collect_rollout()  # the models' own attention: grouped
    assert batch.group_size == 2
    strip_peft(t.models.reward_model).config._attn_implementation = "flash_attention_2"
    ok, reason = shared_rows_match(t.models, batch.query_ids, batch.query_mask, _generated(batch), t.rollout_settings)
    assert not ok and "flash_attention_2" in reason


def test_share_prompt_off_and_k_1_keep_plain_rows(tmp_path, word_dirs):
    off = trainer(make_config(tmp_path, word_dirs, "off", num_generations=2, share_prompt=False), PROMPTS)
    assert off.rollout_settings.group_size == 1 and off.collect_rollout().group_size == 1
    single = trainer(make_config(tmp_path, word_dirs, "single"), PROMPTS)
    assert single.rollout_settings.group_size == 1 and single.collect_rollout().group_size == 1
    assert single.rollout_settings.shared_rows is None  # nothing checked, nothing grouped
