"""PPO experience making on tiny real models (docs/ppo.md checklist items 1, 3, 5, 14)."""

from __future__ import annotations

import copy

import torch
from ppo_tiny import one_torch_thread, word_dirs, word_tok  # noqa: F401  (fixtures)

from tether.generation import GeneratedBatch, SamplingSettings, cut_at_first_stop, generate_batch, left_pad
from tether.models.loading import disable_dropout, load_causal_lm, load_scalar_model
from tether.ppo.losses import logprobs_from_logits
from tether.ppo.models import PolicyAndValue, RolloutModels, make_value_head, response_logits
from tether.ppo.rollout import (
    RolloutSettings,
    build_sequences,
    last_token_scores,
    make_rollout,
    score_responses,
)

PROMPTS = ["a b c d e f g", "yes", "x y", "good a b c"]


def _queries(tok, prompts=PROMPTS):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return left_pad(ids, tok.pad_token_id)


# ---- item 1 -------------------------------------------------------------------------------------
def test_sampling_logprobs_equal_the_training_forward_with_left_padding_and_a_truncated_response(word_dirs, word_tok):
    model = load_causal_lm(str(word_dirs["policy"]))
    disable_dropout(model)
    tok, T = word_tok, 0.7
    prompts = PROMPTS * 4  # 16 rows, 4 prompt lengths
    query_ids, query_mask = _queries(tok, prompts)
    settings = SamplingSettings(max_new_tokens=12, temperature=T)
    torch.manual_seed(3)
    # the sampler's own log-probs (from the logits generate computed with its KV cache, at T)
    batch = generate_batch(model, tok, query_ids, query_mask, settings, batch_size=8, return_logprobs=True)
    assert batch.stopped.any() and not batch.stopped.all()  # some responses were cut after their stop token
    assert (batch.lengths < batch.responses.shape[1]).any() and batch.logprobs[~batch.mask].eq(0).all()
    gen_logp = batch.logprobs

    model.train()  # the update runs in train mode
    args = build_sequences(query_ids, query_mask, batch.responses, batch.mask)
    with torch.no_grad():
        train_logp = logprobs_from_logits(response_logits(model, *args, query_ids.shape[1]), batch.responses, T)
    mask = batch.mask
    assert (train_logp - gen_logp)[mask].abs().max() <= 1e-5

    # the same prompt and response alone (no padding at all) give the same log-probs
    row = 1  # the shortest prompt: it has the most left padding in the batch
    p = query_ids[row, query_mask[row].bool()].unsqueeze(0)
    r = batch.responses[row, : batch.lengths[row]].unsqueeze(0)
    alone = build_sequences(p, torch.ones_like(p), r, torch.ones_like(r, dtype=torch.bool))
    with torch.no_grad():
        alone_logp = logprobs_from_logits(response_logits(model, *alone, p.shape[1]), r, T)
    assert (alone_logp[0] - train_logp[row, : batch.lengths[row]]).abs().max() <= 1e-5


# ---- item 3 -------------------------------------------------------------------------------------
def test_the_stop_token_is_inside_the_masks_and_what_follows_it_changes_nothing(word_dirs, word_tok):
    tok = word_tok
    eos = tok.eos_token_id
    w = tok.convert_tokens_to_ids
    raw_a = torch.tensor([[w("a"), w("b"), eos, w("c"), w("d")], [w("x"), w("y"), w("z"), w("no"), w("yes")]])
    raw_b = torch.tensor([[w("a"), w("b"), eos, w("good"), eos], [w("x"), w("y"), w("z"), w("no"), w("yes")]])
    cut_a, cut_b = (cut_at_first_stop(r, [eos], tok.pad_token_id) for r in (raw_a, raw_b))
    assert torch.equal(cut_a.responses, cut_b.responses)
    assert cut_a.lengths.tolist() == [3, 5] and cut_a.stopped.tolist() == [True, False]
    assert cut_a.mask.tolist() == [[True, True, True, False, False], [True] * 5]  # the stop token is real

    policy = load_causal_lm(str(word_dirs["policy"]))
    value = load_scalar_model(str(word_dirs["rm"]))
    rm = load_scalar_model(str(word_dirs["rm"]))
    models = PolicyAndValue(policy, value)
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.5)  # a reference that differs, so the KL is not zero
    q, qm = _queries(tok, ["a b", "c"])
    settings = RolloutSettings(SamplingSettings(temperature=0.7), missing_stop_penalty=-1.0)
    ro = score_responses(RolloutModels(models, ref, rm), q, qm, cut_a, settings)
    real = ro.response_mask
    assert ro.logprobs[0, 2] < 0 and ro.kl[0, 2] != 0  # log-prob and KL of the stop token count
    for t in (ro.logprobs, ro.ref_logprobs, ro.values, ro.kl, ro.kl_penalty):
        assert t[~real].eq(0).all()  # neutral after the end
    # the score is read at the stop token (index P + 2), and the row that never stopped gets the penalty
    args = build_sequences(q, qm, cut_a.responses, cut_a.mask)
    with torch.no_grad():
        per_token = torch.stack([r for r in _token_scores(rm, *args)])
    assert torch.isclose(ro.raw_scores[0], per_token[0, q.shape[1] + 2], atol=1e-6)
    assert ro.scores.tolist()[1] == -1.0 and ro.scores[0] == ro.raw_scores[0]


def _token_scores(model, ids, mask, pos):
    from tether.models.scoring import token_scores

    return token_scores(model, ids, mask, pos)


# ---- item 5 -------------------------------------------------------------------------------------
def test_kl_is_exactly_zero_for_equal_weights_in_train_mode_with_dropout_configured(tmp_path, word_tok):
    from ppo_tiny import make_policy, make_random_rm

    tok = word_tok
    policy_dir = make_policy(tmp_path / "p", tok, seed=5, attention_dropout=0.5)
    rm_dir = make_random_rm(tmp_path / "rm", tok, attention_dropout=0.5)
    q, qm = _queries(tok)
    responses = torch.tensor([[tok.convert_tokens_to_ids(x) for x in ("a", "b", "c", "d")]] * len(PROMPTS))
    batch = cut_at_first_stop(responses, [tok.eos_token_id], tok.pad_token_id)

    def rollout(clean: bool):
        policy, value, rm = (
            load_causal_lm(str(policy_dir)),
            load_scalar_model(str(rm_dir)),
            load_scalar_model(str(rm_dir)),
        )
        ref = copy.deepcopy(policy)
        for m in (policy, ref, value, rm):
            if clean:
                disable_dropout(m)
            m.train()  # train mode everywhere: dropout would be live here
        torch.manual_seed(0)
        models = PolicyAndValue(policy, value).train()
        settings = RolloutSettings(SamplingSettings(temperature=0.7))
        first = score_responses(RolloutModels(models, ref, rm), q, qm, batch, settings)
        second = score_responses(RolloutModels(models, ref, rm), q, qm, batch, settings)
        return first, second

    first, second = rollout(clean=True)
    assert first.kl.eq(0).all() and first.kl_penalty.eq(0).all()
    assert torch.equal(first.values, second.values) and torch.equal(first.raw_scores, second.raw_scores)
    # the guard is needed: left alone, Llama's (functional) attention dropout is live in train mode
    leaky, _ = rollout(clean=False)
    assert leaky.kl.abs().max() > 1e-3


# ---- item 14 ------------------------------------------------------------------------------------
def test_reward_of_ppo_tokens_equals_the_reward_of_the_text_as_the_rm_was_trained(tiny_rm_dir, tokenizer):
    """SmolLM2's tokenizer (chat template; pad == stop token), a random tiny RM of its vocabulary.

    The expectations are built without tether's tokenisation helpers: the "sampled" ids are what the
    model emits after the generation prompt when it writes the assistant turn of the tokenizer's own
    chat template (cut after its stop token), and the reference score is the RM's head read by hand at
    the stop token of that conversation, unpadded."""
    from tether.data.templates import prompt_ids
    from tether.models.scoring import score_texts

    rm = load_scalar_model(str(tiny_rm_dir)).eval()
    prompts = ["What is the capital of France?", "Hi", "Name three colours, please, and say why you like them."]
    responses = ["Paris.", "Hello! How can I help you today?", "Red, green and blue."]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampled, conversations = [], []
    for p, r in zip(prompts, responses):
        user = [{"role": "user", "content": p}]
        asked = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        whole = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": r}], tokenize=True, return_dict=False
        )
        assert whole[: len(asked)] == asked and prompt_ids(tokenizer, p) == asked  # PPO's query is the template's
        emitted = whole[len(asked) :]
        emitted = emitted[: emitted.index(stop) + 1]  # the sampler stops at (and keeps) <|im_end|>
        sampled.append(emitted)
        conversations.append(asked + emitted)
    # PPO holds the prompt's ids (left-padded) and the sampled ids, right-padded after the stop token
    q, qm = left_pad([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    width = max(map(len, sampled)) + 2
    raw = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sampled])
    batch = cut_at_first_stop(raw, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert batch.stopped.all() and batch.lengths.tolist() == [len(s) for s in sampled]
    args = build_sequences(q, qm, batch.responses, batch.mask)
    with torch.no_grad():
        ppo_scores = last_token_scores(rm, *args, q.shape[1], batch.lengths)
        by_hand = torch.stack(
            [rm.score(rm.model(input_ids=torch.tensor([ids])).last_hidden_state)[0, -1, 0] for ids in conversations]
        )
    assert torch.allclose(ppo_scores, by_hand, atol=1e-5)
    assert torch.allclose(score_texts(rm, tokenizer, prompts, responses), by_hand, atol=1e-5)  # as trained


# ---- sampling ---------------------------------------------------------------------------------
def test_generate_batch_ignores_the_models_own_sampling_defaults(word_dirs, word_tok):
    model = load_causal_lm(str(word_dirs["policy"]))
    model.generation_config.min_p = 0.99  # would make sampling greedy if generate inherited it
    model.generation_config.repetition_penalty = 3.0
    q, qm = _queries(word_tok, ["a b"] * 8)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    out = generate_batch(model, word_tok, q, qm, settings)
    assert len({tuple(r.tolist()) for r in out.responses}) > 1  # still pure sampling: rows differ
    assert model.generation_config.min_p == 0.99  # the model's config is restored afterwards


def test_fixed_length_generation_never_stops(word_dirs, word_tok):
    model = load_causal_lm(str(word_dirs["policy"]))
    eos = word_tok.eos_token_id

    def stop_is_likeliest(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 100.0
        return logits

    model.lm_head.register_forward_hook(stop_is_likeliest)
    q, qm = _queries(word_tok)
    torch.manual_seed(0)
    free = generate_batch(model, word_tok, q, qm, SamplingSettings(max_new_tokens=7), batch_size=3)
    assert free.lengths.tolist() == [1, 1, 1, 1] and free.stopped.all()
    fixed = generate_batch(model, word_tok, q, qm, SamplingSettings(max_new_tokens=7, fixed_length=True))
    assert fixed.responses.shape == (4, 7) and fixed.lengths.eq(7).all() and fixed.stopped.all()
    assert fixed.responses.eq(eos).all()  # nothing was cut although every token is the stop token


# ---- a whole rollout ----------------------------------------------------------------------------
def test_make_rollout_reads_every_model_once_and_keeps_layout(word_dirs, word_tok):
    policy = load_causal_lm(str(word_dirs["policy"]))
    disable_dropout(policy)
    models = PolicyAndValue(policy, value_head=make_value_head(policy)).train()
    rm = load_scalar_model(str(word_dirs["counting_rm"])).eval()
    ref = copy.deepcopy(policy).eval()
    q, qm = _queries(word_tok)
    rows_read = {"policy": [], "reference": [], "reward model": [], "value head": []}

    def count(name):  # rows of every real forward of that network over full [prompt | response] rows
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if name == "value head" or ids.shape[1] > q.shape[1]:  # not generate()'s prefill or decoding steps
                rows_read[name].append(ids.shape[0])

        return hook

    networks = {"policy": policy, "reference": ref, "reward model": rm, "value head": models.value_head}
    for name, network in networks.items():
        network.register_forward_pre_hook(count(name), with_kwargs=True)
    generate_calls = []
    policy.register_forward_pre_hook(lambda _m, args, kwargs: generate_calls.append(1), with_kwargs=True)
    torch.manual_seed(1)
    settings = RolloutSettings(SamplingSettings(max_new_tokens=5, temperature=0.7), forward_batch_size=3)
    ro = make_rollout(RolloutModels(models, ref, rm), word_tok, q, qm, settings, prompts=PROMPTS)
    # each model reads each of the 4 episodes exactly once, in no-grad chunks of 3 + 1
    assert rows_read == {"policy": [3, 1], "reference": [3, 1], "reward model": [3, 1], "value head": [3, 1]}
    assert len(generate_calls) > 2  # the sampler's own forwards are the others
    n, width = ro.responses.shape
    assert n == 4 and width == int(ro.lengths.max()) and ro.input_ids.shape == (4, q.shape[1] + width)
    assert torch.equal(ro.logprobs, ro.ref_logprobs) and ro.kl.eq(0).all()  # same weights
    assert ro.values.eq(0).all()  # the value head starts at zero
    assert ro.time_generate > 0 and ro.time_score > 0
    texts = ro.response_texts(word_tok)
    assert len(texts) == 4 and all("<eos>" not in t for t in texts)
    sub = ro.select(torch.tensor([2, 0]))
    assert sub.prompts == [PROMPTS[2], PROMPTS[0]] and torch.equal(sub.responses[1], ro.responses[0])


def test_generated_batch_mask_comes_from_lengths_not_from_pad_ids():
    pad = eos = 2
    batch = cut_at_first_stop(torch.tensor([[5, eos, eos, eos], [eos, 7, 7, 7]]), [eos], pad)
    assert batch.lengths.tolist() == [2, 1]
    assert batch.mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert isinstance(batch, GeneratedBatch)
