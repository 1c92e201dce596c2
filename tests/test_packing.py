"""Padding-free rows (``tether.models.packing``) for the reward model and DPO: the layout by hand,
exactness against plain rows on a tiny model, one training step, and the fallback to plain rows."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch

from tether.models.packing import (
    PLAIN,
    Layout,
    Segment,
    block_attention,
    lay_out_rows,
    pack_by_length,
    probe_rows,
    probe_units,
)
from tether.stages.dpo import TokenizedPair as DPOPair
from tether.stages.dpo import check_fast_paths, collate_pairs, response_logps
from tether.stages.reward import (
    PreferenceCollator,
    TokenizedPair,
    bradley_terry_loss,
    choose_reward_layout,
    pair_rewards,
)

# (prompt, chosen, rejected) token lengths: A = 2+1+1, B = 1+1+1, C = 3+2+2, D = 1+1+2
SHAPES = {"A": (2, 1, 1), "B": (1, 1, 1), "C": (3, 2, 2), "D": (1, 1, 2)}
STOP = 2


def _hand_pairs(seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    out = []
    for p, c, r in SHAPES.values():
        # distinct responses (a 1-token one is not the stop token): identical ones would share a branch
        draw = lambda n: tuple(rng.randrange(10, 400) for _ in range(max(1, n - 1))) + (STOP,) * (n > 1)  # noqa: E731
        out.append(TokenizedPair(tuple(rng.randrange(10, 400) for _ in range(p)), draw(c), draw(r)))
    return out


def _random_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Pairs of very different lengths (prompts 1–40 tokens, responses 1–25)."""
    rng = random.Random(seed)
    ids = lambda k: tuple(rng.randrange(10, 400) for _ in range(k))  # noqa: E731
    return [
        TokenizedPair(ids(rng.randint(1, 40)), ids(rng.randint(0, 24)) + (STOP,), ids(rng.randint(0, 24)) + (STOP,))
        for _ in range(n)
    ]


def test_rows_tokens_and_padding_fraction_by_hand():
    # segment lengths A 4, B 3, C 7, D 4; capacity = the longest (7). Best fit, longest first:
    # C -> row 0 (full); A -> row 1 (3 free); D does not fit in 3 -> row 2 (3 free); B (3) -> row 1.
    segments = [Segment(p, (c, r)) for p, c, r in SHAPES.values()]
    assert pack_by_length([s.length for s in segments], 7) == [[2], [0, 1], [3]]
    batch = PreferenceCollator(0, share_prompt=True, padding_free=True)(_hand_pairs())
    assert tuple(batch["input_ids"].shape) == (3, 7)  # 18 real tokens in 21 slots: padding 3/21
    plain_shared = PreferenceCollator(0, share_prompt=True, padding_free=False)(_hand_pairs())
    assert tuple(plain_shared["input_ids"].shape) == (4, 7)  # 18 in 28: padding 10/28
    plain = PreferenceCollator(0, share_prompt=False)(_hand_pairs())
    assert tuple(plain["input_ids"].shape) == (8, 5)  # 2·18 − (2+1+3+1) = 29 tokens in 40
    rows = lay_out_rows([list(range(s.length)) for s in segments], segments, 0, pack=True)
    assert rows.real_tokens == 18 and rows.padding_fraction == pytest.approx(3 / 21)
    # where each response's stop token is read: row · 7 + offset + end
    assert batch["chosen_index"].tolist() == [7 + 2, 7 + 4 + 1, 4, 14 + 1]
    assert batch["rejected_index"].tolist() == [7 + 3, 7 + 4 + 2, 6, 14 + 3]


def test_block_diagonal_mask_and_positions_by_hand():
    rows = lay_out_rows(
        [
            list(range(s.length))
            for s in [Segment(2, (1, 1)), Segment(1, (1, 1)), Segment(3, (2, 2)), Segment(1, (1, 2))]
        ],
        [Segment(2, (1, 1)), Segment(1, (1, 1)), Segment(3, (2, 2)), Segment(1, (1, 2))],
        0,
        pack=True,
    )
    # row 1 = A (prompt 2, chosen 1, rejected 1) then B (prompt 1, chosen 1, rejected 1)
    assert rows.attention()[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],  # A prompt
        [1, 1, 0, 0, 0, 0, 0],  # A prompt
        [1, 1, 1, 0, 0, 0, 0],  # A chosen: A's prompt and itself
        [1, 1, 0, 1, 0, 0, 0],  # A rejected: A's prompt, not A's chosen
        [0, 0, 0, 0, 1, 0, 0],  # B prompt: nothing of A
        [0, 0, 0, 0, 1, 1, 0],  # B chosen
        [0, 0, 0, 0, 1, 0, 1],  # B rejected
    ]
    assert rows.position_ids[1].tolist() == [0, 1, 2, 2, 0, 1, 1]
    # row 2 = D (prompt 1, chosen 1, rejected 2) and 3 padding slots, each attending to itself only
    assert rows.attention()[2, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    assert rows.position_ids[2].tolist()[:4] == [0, 1, 1, 2]
    assert rows.segment_ids.tolist() == [[2] * 7, [0] * 4 + [1] * 3, [3] * 4 + [-1] * 3]
    # two plain sequences side by side: the same formula gives a block-diagonal causal mask
    two = block_attention(torch.tensor([[0, 0, 1, 1]]), torch.zeros(1, 4, dtype=torch.long))
    assert two[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_rm(request, tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir, attn_implementation=request.param).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_lm(request, tiny_model_dir):
    from tether.models.loading import load_causal_lm

    return load_causal_lm(str(tiny_model_dir), attn_implementation=request.param).eval()


@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_rewards_equal_plain_rows(tiny_rm, share_prompt):
    pairs = _hand_pairs() + _random_pairs(12, seed=1)
    with torch.no_grad():
        plain = torch.stack(pair_rewards(tiny_rm, PreferenceCollator(0, share_prompt=False)(pairs)))
        batch = PreferenceCollator(0, share_prompt=share_prompt, padding_free=True)(pairs)
        packed = torch.stack(pair_rewards(tiny_rm, batch))
    assert batch["input_ids"].shape[0] < (len(pairs) if share_prompt else 2 * len(pairs))  # rows were shared
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        bradley_terry_loss(*packed), bradley_terry_loss(*plain), atol=1e-6, rtol=1e-6
    )  # the same mean over the same pairs
    assert choose_reward_layout(tiny_rm, pairs, 0) == Layout(share_prompt=True, padding_free=True)


def test_a_packed_pair_is_blind_to_its_row_neighbours(tiny_rm):
    pairs = _hand_pairs(seed=0)
    other = _hand_pairs(seed=5)  # the same lengths, other tokens
    changed = [other[0]] + pairs[1:]  # A changes; B shares A's row
    collate = PreferenceCollator(0, share_prompt=True, padding_free=True)
    with torch.no_grad():
        before = torch.stack(pair_rewards(tiny_rm, collate(pairs)))
        after = torch.stack(pair_rewards(tiny_rm, collate(changed)))
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-3  # A's own scores move
    torch.testing.assert_close(after[:, 1:], before[:, 1:], atol=1e-6, rtol=0)  # B (same row), C, D do not


@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_dpo_logps_equal_plain_rows(tiny_lm, share_prompt):
    pairs = [DPOPair(list(p.prompt), list(p.chosen), list(p.rejected)) for p in _hand_pairs() + _random_pairs(12, 2)]
    with torch.no_grad():
        plain = torch.stack(response_logps(tiny_lm, collate_pairs(pairs, STOP, share_prompt=False), compact_head=False))
        batch = collate_pairs(pairs, STOP, share_prompt=share_prompt, padding_free=True)
        packed = torch.stack(response_logps(tiny_lm, batch))
    assert batch["input_ids"].shape[0] < (len(pairs) if share_prompt else 2 * len(pairs))
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert check_fast_paths(tiny_lm, pairs, STOP) == (Layout(share_prompt=True, padding_free=True), True)


def _ranked_groups(seed: int) -> list[TokenizedPair]:
    """Two prompts with 4 and 3 responses and every pair among them (6 + 3), then one pair of its own."""
    rng = random.Random(seed)
    ids = lambda k: tuple(rng.randrange(10, 400) for _ in range(k))  # noqa: E731
    out = []
    for prompt_len, k in ((9, 4), (4, 3)):
        prompt, responses = ids(prompt_len), [ids(rng.randint(1, 6)) + (STOP,) for _ in range(k)]
        out += [TokenizedPair(prompt, responses[a], responses[b]) for a in range(k) for b in range(a + 1, k)]
    return out + [TokenizedPair(ids(5), ids(2) + (STOP,), ids(3) + (STOP,))]


def test_pairs_of_one_prompt_share_one_segment_by_hand():
    from tether.models.packing import group_pairs_by_prompt

    p, q = (1, 2, 3), (4, 5)
    a, b, c = (10, STOP), (11, 12, STOP), (13, STOP)
    groups = group_pairs_by_prompt([(p, a, b), (q, a, c), (p, c, a), (p, b, c)])
    # p: responses a, b, c (a once although in two pairs); q: a, c
    assert groups.segments == [Segment(3, (2, 3, 2)), Segment(2, (2, 2))]
    assert groups.tokens == [list(p + a + b + c), list(q + a + c)]
    assert groups.responses == [a, b, c, a, c]
    assert (groups.segment_of, groups.branch_of) == ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    assert (groups.chosen, groups.rejected) == ([0, 3, 2, 1], [1, 4, 0, 2])
    batch = PreferenceCollator(0, share_prompt=True, padding_free=False)(
        [TokenizedPair(*x) for x in [(p, a, b), (q, a, c), (p, c, a), (p, b, c)]]
    )
    # rows of width 10: p's stop tokens at 3+2−1, 3+2+3−1, 3+2+3+2−1; q's (row 1) at 2+2−1, 2+2+2−1
    assert batch["chosen_index"].tolist() == [4, 10 + 3, 9, 7]
    assert batch["rejected_index"].tolist() == [7, 10 + 5, 4, 9]
    dpo = collate_pairs([DPOPair(list(x[0]), list(x[1]), list(x[2])) for x in [(p, a, b), (q, a, c)]], STOP)
    # responses a, b of p (segment 0) and a, c of q (segment 1): 2 + 3 + 2 + 2 tokens, each once
    assert dpo["token_sequence"].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    # a response's first token is read from the prompt's last position
    assert dpo["token_source"].tolist() == [2, 3, 2, 5, 6, 1, 2, 1, 4]
    assert (dpo["chosen_sequence"].tolist(), dpo["rejected_sequence"].tolist()) == ([0, 2], [1, 3])


@pytest.mark.parametrize("padding_free", [True, False])
def test_ranked_groups_in_one_segment_equal_plain_rows(tiny_rm, tiny_lm, padding_free):
    pairs = _ranked_groups(seed=4)
    with torch.no_grad():
        plain = torch.stack(pair_rewards(tiny_rm, PreferenceCollator(0, share_prompt=False)(pairs)))
        batch = PreferenceCollator(0, share_prompt=True, padding_free=padding_free)(pairs)
        grouped = torch.stack(pair_rewards(tiny_rm, batch))
        torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)
        assert batch["input_ids"].shape[0] <= 3  # 10 pairs, 3 prompts: one segment each
        dpo_pairs = [DPOPair(list(x.prompt), list(x.chosen), list(x.rejected)) for x in pairs]
        plain_logps = torch.stack(response_logps(tiny_lm, collate_pairs(dpo_pairs, STOP, share_prompt=False)))
        dpo_batch = collate_pairs(dpo_pairs, STOP, share_prompt=True, padding_free=padding_free)
        torch.testing.assert_close(torch.stack(response_logps(tiny_lm, dpo_batch)), plain_logps, atol=1e-5, rtol=1e-5)
        assert int(dpo_batch["num_sequences"]) == 4 + 3 + 2  # each distinct response once
        distinct = {(x.prompt, r) for x in pairs for r in (x.chosen, x.rejected)}
        assert len(dpo_batch["token_target"]) == sum(len(r) for _, r in distinct)


def _one_sgd_step(model, loss_fn) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn(model).backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_training_step_packed_gives_the_weights_of_plain_rows(tiny_rm_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tiny_rm = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    tiny_lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = _random_pairs(8, seed=3)

    def rm_loss(layout: Layout):
        batch = PreferenceCollator(0, layout.share_prompt, layout.padding_free)(pairs)
        return lambda model: bradley_terry_loss(*pair_rewards(model, batch))

    plain = _one_sgd_step(tiny_rm, rm_loss(PLAIN))
    packed = _one_sgd_step(tiny_rm, rm_loss(Layout(True, True)))
    moved = max((plain[k] - v).abs().max().item() for k, v in tiny_rm.state_dict().items())
    assert moved > 1e-3  # the step did something
    for key in plain:
        torch.testing.assert_close(packed[key], plain[key], atol=1e-5, rtol=1e-5)

    dpo_pairs = [DPOPair(list(p.prompt), list(p.chosen), list(p.rejected)) for p in pairs]

    def dpo_loss(layout: Layout):  # −mean log σ(β·(log π(y_w) − log π(y_l)) − c): the reference enters as a constant
        batch = collate_pairs(dpo_pairs, STOP, layout.share_prompt, layout.padding_free)
        return lambda model: (
            -torch.nn.functional.logsigmoid(
                0.1 * (response_logps(model, batch)[0] - response_logps(model, batch)[1])
            ).mean()
        )

    plain = _one_sgd_step(tiny_lm, dpo_loss(PLAIN))
    packed = _one_sgd_step(tiny_lm, dpo_loss(Layout(True, True)))
    for key in plain:
        torch.testing.assert_close(packed[key], plain[key], atol=1e-5, rtol=1e-5)


def _sliding_window_mistral():
    """A tiny Mistral reward model with a 2-token sliding window: plain rows get the window from
    transformers' own mask, a custom 4-D mask replaces it, so every shared or packed layout differs."""
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=2,
        num_labels=1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = MistralForSequenceClassification(config).eval()
    return model


def test_a_model_that_breaks_the_4d_mask_falls_back_to_plain_rows(tokenizer, caplog):
    """Mistral with a 2-token sliding window: plain rows get the window from transformers' own mask, a
    custom 4-D mask replaces it, so every fast layout differs and the check keeps plain rows."""
    model = _sliding_window_mistral()
    pairs = _hand_pairs()
    with caplog.at_level(logging.WARNING, logger="tether.models.packing"):
        assert choose_reward_layout(model, pairs, 0) == PLAIN
    refused = [r.getMessage() for r in caplog.records]
    assert len(refused) == 4 and all("differ from plain rows" in m and "trying the next" in m for m in refused[:3])
    assert refused[3] == "tether rm: using separate padded rows"
    assert "shared-prompt padding-free rows" in refused[0] and "separate padding-free rows" in refused[2]
    # and with the options off nothing is tried
    caplog.clear()
    assert choose_reward_layout(model, pairs, 0, share_prompt=False, padding_free=False) == PLAIN
    assert not caplog.records


def test_prompt_grouped_order_keeps_a_prompts_pairs_together():
    from tether.stages.common import PromptGroupedSampler

    keys = ["a", "b", "a", "c", "b", "a", "d"]
    sampler = PromptGroupedSampler(keys, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(7))  # every pair once
        runs = [keys[i] for k, i in enumerate(order) if k == 0 or keys[order[k - 1]] != keys[i]]
        assert sorted(runs) == ["a", "b", "c", "d"]  # each prompt's pairs in one run
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled across epochs
    sampler.set_epoch(2)
    assert list(sampler) == orders[2]  # the same on every process and on resume


def test_reward_trainer_groups_only_repeated_prompts(tmp_path, tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from tether.stages.common import PromptGroupedSampler
    from tether.stages.reward import RewardTrainer
    from tether.stages.sft import ListDataset

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], seed=5)
    distinct = RewardTrainer(model=model, args=args, train_dataset=ListDataset(_random_pairs(6, seed=0)))
    assert type(distinct._get_train_sampler()) is torch.utils.data.RandomSampler
    grouped = RewardTrainer(model=model, args=args, train_dataset=ListDataset(_ranked_groups(seed=0)))
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, PromptGroupedSampler) and [len(g) for g in sampler.groups] == [6, 3, 1]


# ---------------------------------------------------------------------------------------------
# scoring several responses to one prompt (best-of-N, evaluation samples)
# ---------------------------------------------------------------------------------------------
def _slots_seen(model) -> list[int]:
    """Token slots (rows × width) of every forward pass of ``model`` from now on."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    return seen


def test_probe_units_are_the_longest_and_the_two_shortest_by_hand():
    # sizes 5 9 3 9 4 7: the longest is unit 1 (the first of the two 9s); of the rest, 3 (unit 2) and 4 (unit 4)
    assert probe_units([5, 9, 3, 9, 4, 7]) == [1, 2, 4]
    assert probe_units([6, 2]) == [0, 1] and probe_units([3]) == [0] and probe_units([]) == []
    # two shortest units share a padding-free row of the longest's width exactly when any two units can:
    # 4 + 5 ≤ 10 here, so the probe's rows pack them as the whole batch's rows would
    sizes = [10, 4, 5, 8]
    assert pack_by_length([sizes[i] for i in probe_units(sizes)], 10) == [[0], [1, 2]]
    # rows of four prompts: A (2 tokens) with responses 1 + 3 -> segment 6; B (3) with 1 -> 4; C (1) with 8 -> 9;
    # D (4) with 1 + 1 -> 6 (D comes after A). Probe: C (the longest), B and A (the two shortest, A before D)
    a, b, c, d = [1, 2], [3, 4, 5], [6], [7, 8, 9, 10]
    assert probe_rows([a, b, c, a, d, d], [1, 1, 8, 3, 1, 1]) == [0, 1, 2, 3]


def test_the_scoring_check_reads_three_prompts_of_the_first_batch(tiny_rm_dir):
    """Five prompts in one batch (segments of 4, 5, 10, 6 and 7 tokens): the first call checks the layout
    on the longest prompt and the two shortest (their 6 sequences in plain rows, the 3 segments shared),
    then scores the whole batch as shared segments; every score equals a plain row's."""
    from transformers import AutoModelForSequenceClassification

    from tether.models.scoring import score_sequences

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    prompts = {1: [11, 12], 2: [21, 22, 23], 3: [31, 32, 33, 34], 4: [41, 42, 43, 44, 45], 5: [51] * 6}
    responses = [(1, [60]), (3, [61]), (2, [62, 63]), (1, [64]), (3, [65, 66]), (4, [67]), (3, [68, 69, 70]), (5, [71])]
    sequences = [prompts[p] + r for p, r in responses]
    lengths = [len(prompts[p]) for p, _ in responses]
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    got = score_sequences(model, sequences, 0, batch_size=8, prompt_lengths=lengths)
    assert rows == [6, 3, 5]  # probe plain (2 + 1 + 3 sequences of prompts 1, 2, 3), probe shared, the batch shared
    rows.clear()
    torch.testing.assert_close(got, score_sequences(model, sequences, 0, batch_size=8), atol=1e-5, rtol=0)
    assert rows == [8]


def test_responses_sharing_a_prompt_score_as_in_separate_rows(tiny_rm_dir, tokenizer):
    """Three prompts (one a multi-turn conversation) with 3, 4 and 1 responses, one of them cut at the
    budget (no stop token) and one empty: the shared-prompt segments give each response the score plain
    rows give it, with fewer token slots."""
    from transformers import AutoModelForSequenceClassification

    from tether.data.records import Message
    from tether.data.templates import prompt_response_ids
    from tether.models.scoring import score_sequences, score_texts

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    chat = [Message("user", "Name a colour."), Message("assistant", "Red."), Message("user", "Another one?")]
    prompts = ["What is two plus two?"] * 3 + [chat] * 4 + ["Say hi."]
    responses = ["Four.", "It is 4", "", "Blue.", "Green, like grass.", "Yellow", "Purple and", "Hi!"]
    stopped = [True, True, True, True, True, True, False, True]
    slots = _slots_seen(model)
    shared = score_texts(model, tokenizer, prompts, responses, batch_size=8, stopped=stopped)
    shared_slots = sum(slots)
    slots.clear()
    ids = [prompt_response_ids(tokenizer, p, r, None, s)[0] for p, r, s in zip(prompts, responses, stopped)]
    plain = score_sequences(model, ids, tokenizer.pad_token_id, batch_size=8)  # no prompt lengths: plain rows
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert sum(slots) == len(ids) * max(len(x) for x in ids)  # one padded batch of 8 rows
    # (the first call per model also ran the plain rows once to check the layout: the same slots again)
    assert shared_slots > sum(slots)
    slots.clear()
    again = score_texts(model, tokenizer, prompts, responses, batch_size=8, stopped=stopped)
    torch.testing.assert_close(again, shared, atol=0, rtol=0)
    assert len(slots) == 1 and slots[0] < len(ids) * max(len(x) for x in ids)  # checked once: shared rows only


def test_scoring_with_shared_prompts_falls_back_when_the_model_breaks_the_mask(tokenizer, caplog):
    """Mistral with a 2-token sliding window: a custom 4-D mask changes its scores, so the check on the
    first batch keeps separate rows, and says why."""
    from tether.models.scoring import score_sequences

    model = _sliding_window_mistral()
    prompt = [5, 6, 7, 8, 9]
    sequences = [prompt + [10, 11], prompt + [12], prompt + [13, 14, 15]]
    with caplog.at_level(logging.WARNING, logger="tether.models.packing"):
        got = score_sequences(model, sequences, 0, batch_size=2, prompt_lengths=[5, 5, 5])
    refused = [r.getMessage() for r in caplog.records]
    assert len(refused) == 2 and "scoring: shared-prompt padded rows differ from plain rows" in refused[0]
    assert refused[1] == "scoring: using separate padded rows"
    torch.testing.assert_close(got, score_sequences(model, sequences, 0, batch_size=2), atol=1e-6, rtol=0)
