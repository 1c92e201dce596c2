"""PPO equations against hand-computed numbers (docs/ppo.md checklist items 3, 4, 6, 7, 11, 12)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.ppo.advantages import gae_advantages, masked_moments, whiten
from tether.ppo.kl_control import AdaptiveKLController, FixedKLController, adaptive_kl_update, make_kl_controller
from tether.ppo.losses import (
    apply_missing_stop_penalty,
    entropy_from_logits,
    explained_variance,
    full_kl_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
)
from tether.ppo.monitor import KL_BANDS, KLMonitor, kl_band

NAN = float("nan")


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0
    )


# ---- item 6: GAE --------------------------------------------------------------------------------
def test_gae_on_a_four_token_example_by_hand():
    # row 0: four real tokens; row 1: two real tokens then padding full of junk that must not leak
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.0], [0.3, 0.7, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 5.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # γλ = 0.45.  Row 0, from the end (V past the last token = 0):
    #   δ3 = 1.0 − 0.2 = 0.8                     A3 = 0.8
    #   δ2 = 0 + 0.9·0.2 − 0.3 = −0.12           A2 = −0.12 + 0.45·0.8 = 0.24
    #   δ1 = −0.2 + 0.9·0.3 − 0.4 = −0.33        A1 = −0.33 + 0.45·0.24 = −0.222
    #   δ0 = 0.1 + 0.9·0.4 − 0.5 = −0.04         A0 = −0.04 + 0.45·(−0.222) = −0.1399
    # Row 1 (its value at t=2 is padding, so it bootstraps 0):
    #   δ1 = 0.7 − 0.2 = 0.5                     A1 = 0.5
    #   δ0 = 0.3 + 0.9·0.2 − 0.1 = 0.38          A0 = 0.38 + 0.45·0.5 = 0.605
    assert close(adv, [[-0.1399, -0.222, 0.24, 0.8], [0.605, 0.5, 0.0, 0.0]])
    # returns = A + V from the un-whitened advantages; padding gets 0
    assert close(ret, [[0.3601, 0.178, 0.54, 1.0], [0.705, 0.7, 0.0, 0.0]])


def test_gae_with_the_reference_defaults():
    rewards = torch.tensor([[0.1, -0.2, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 4, dtype=torch.bool), gamma=1.0, lam=0.95)
    # δ = [0, −0.3, −0.1, 0.8];  A3 = 0.8, A2 = −0.1 + 0.95·0.8 = 0.66, A1 = −0.3 + 0.95·0.66 = 0.327,
    # A0 = 0 + 0.95·0.327 = 0.31065
    assert close(adv, [[0.31065, 0.327, 0.66, 0.8]])
    assert close(ret, adv + values)


# ---- item 7: whitening ------------------------------------------------------------------------
def test_whitening_uses_real_tokens_only_with_biased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, NAN, -7e5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # real values 1..5: mean 3, biased variance (4+1+0+1+4)/5 = 2
    mean, var = masked_moments(x, mask)
    assert close(mean, 3.0) and close(var, 2.0)
    w = whiten(x, mask)
    s = math.sqrt(2.0 + 1e-8)
    assert close(w, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    kept = whiten(x, mask, shift_mean=False)  # the mean is added back
    assert close(kept[mask], torch.tensor([-2, -1, 0, 1, 2.0]) / s + 3)
    assert kept[~mask].eq(0).all()


# ---- item 4: score placement and the missing-stop penalty ------------------------------------
def test_score_sits_at_the_stop_token_index_on_a_four_token_example():
    kl = torch.tensor([[0.1, 0.2, -0.1, 0.3], [0.4, 0.2, 7.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # row 1 stopped at index 1
    r = token_rewards(kl, torch.tensor([2.0, -1.0]), mask, beta=0.5)
    # r_t = −β·KL_t, plus the score at index L−1 (the stop token itself, not one past it)
    assert close(r, [[-0.05, -0.1, 0.05, -0.15 + 2.0], [-0.2, -0.1 - 1.0, 0.0, 0.0]])


def test_a_response_without_a_stop_token_gets_the_penalty_instead_of_its_score():
    scores = torch.tensor([3.0, -0.5, 2.0])
    stopped = torch.tensor([True, False, False])
    assert close(apply_missing_stop_penalty(scores, stopped, -1.0), [3.0, -1.0, -1.0])  # replaced, not subtracted
    assert close(apply_missing_stop_penalty(scores, stopped, None), scores)


# ---- KL estimators -------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -1.5])
    ref = torch.tensor([-1.5, -1.0])  # d = +0.5, −0.5
    assert close(kl_penalty(logp, ref, "k1"), [0.5, -0.5])
    assert close(kl_penalty(logp, ref, "kl"), [0.5, -0.5])
    assert close(kl_penalty(logp, ref, "abs"), [0.5, 0.5])
    assert close(kl_penalty(logp, ref, "mse"), [0.125, 0.125])
    # k3 = exp(−d) − 1 + d
    assert close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "nope")


def test_full_kl_over_the_vocabulary_at_temperature():
    # π = softmax([0, ln 3]) = (¼, ¾), π_ref = (½, ½): KL = ¼·ln ½ + ¾·ln 1.5
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    ref_logits = torch.zeros(1, 1, 2)
    assert close(full_kl_from_logits(logits, ref_logits), [[expected]])
    # the same distributions at T = 2 come from logits twice as large
    unused = torch.zeros(1, 1)
    assert close(kl_penalty(unused, unused, "full", 2 * logits, 2 * ref_logits, temperature=2.0), [[expected]])


def test_logprobs_and_entropy_divide_the_logits_by_the_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    assert close(logprobs_from_logits(logits, tokens, 1.0), [[math.log(0.75)]])
    # z/T with T = ½: softmax([0, 2 ln 3]) = (1/10, 9/10)
    assert close(logprobs_from_logits(logits, tokens, 0.5), [[math.log(0.9)]])
    assert close(entropy_from_logits(logits, 1.0), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])


# ---- policy and value losses ---------------------------------------------------------------
def test_policy_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.1, -1.5]])
    adv = torch.tensor([[1.0, -2.0]])
    out = policy_loss(logp, old, adv, torch.ones(1, 2, dtype=torch.bool), cliprange=0.2)
    # token 0: ρ = e^0.1 = 1.10517 inside [0.8, 1.2]: loss −1.10517
    # token 1: ρ = e^−0.5 = 0.60653, A = −2: max(1.21306, −2·0.8·(−1)=1.6) = 1.6, the clipped branch
    assert close(out.loss, (-math.exp(0.1) + 1.6) / 2)
    assert close(out.clipfrac, 0.5)
    assert close(out.approx_kl, 0.5 * (0.01 + 0.25) / 2)  # ½·mean(Δ²)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[2.0, -0.5]])
    out = value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), cliprange_value=0.2)
    # token 0: (1−2)² = 1 vs clipped V = 0.5+0.2 = 0.7: (0.7−2)² = 1.69 → 1.69 (clipped branch)
    # token 1: (0+0.5)² = 0.25 vs clipped V = 0.1−0.1 = 0.0: 0.25 → 0.25 (equal: not counted as clipped)
    assert close(out.loss, 0.5 * (1.69 + 0.25) / 2)
    assert close(out.clipfrac, 0.5)


def test_a_given_denominator_makes_micro_batch_losses_add_up_to_the_minibatch_loss():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.rand(4, 5) > 0.3
    whole = policy_loss(logp, old, adv, mask).loss
    n = mask.sum()
    parts = (
        policy_loss(logp[:2], old[:2], adv[:2], mask[:2], denominator=n).loss
        + policy_loss(logp[2:], old[2:], adv[2:], mask[2:], denominator=n).loss
    )
    assert close(parts, whole)


# ---- item 3: masked tokens contribute nothing -------------------------------------------------
def test_masked_positions_change_no_loss_and_no_gradient():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def losses(fill):
        logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
        old = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
        adv = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
        values = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
        old_v = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
        ret = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
        logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(7))
        if fill is not None:
            for t in (logp, old, adv, values, old_v, ret):
                t[~mask] = fill
            # the model's logits after a response's end are finite (padding tokens attend to real
            # ones); extreme but finite values there must still change nothing
            logits[~mask] = 1e4 if fill != fill or fill > 0 else -1e4
        logp.requires_grad_(True)
        values.requires_grad_(True)
        logits.requires_grad_(True)
        pg = policy_loss(logp, old, adv, mask)
        vf = value_loss(values, old_v, ret, mask)
        ent = masked_mean(entropy_from_logits(logits), mask)
        total = pg.loss + 0.1 * vf.loss - 0.01 * ent
        total.backward()
        grads = [g.grad[mask] for g in (logp, values, logits)]
        masked_grads = [g.grad[~mask] for g in (logp, values, logits)]
        return [pg.loss, vf.loss, ent, pg.clipfrac, pg.approx_kl, vf.clipfrac], grads, masked_grads

    base, base_grads, _ = losses(None)
    for fill in (1e9, -1e9, NAN, float("inf")):
        vals, grads, masked_grads = losses(fill)
        assert all(torch.equal(a, b) for a, b in zip(vals, base)), fill
        assert all(torch.equal(a, b) for a, b in zip(grads, base_grads)), fill
        assert all(g.eq(0).all() for g in masked_grads), fill


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -5.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # Var(R) = 2/3, residual (0, 0, 1): Var = 2/9 → EV = 1 − (2/9)/(2/3) = 2/3
    assert close(explained_variance(values, returns, mask), 2 / 3)


# ---- item 11: KL controllers ---------------------------------------------------------------
def test_adaptive_kl_controller_matches_the_ziegler_formula():
    # e = clip(KL/target − 1, ±0.2);  β ← β·(1 + e·n_steps/horizon)
    assert math.isclose(
        adaptive_kl_update(0.2, 9.0, 6.0, 512, 10000), 0.2 * (1 + 0.2 * 512 / 10000)
    )  # e clipped at +0.2
    assert math.isclose(adaptive_kl_update(0.2, 5.4, 6.0, 512, 10000), 0.2 * (1 - 0.1 * 512 / 10000))  # e = −0.1
    assert math.isclose(
        adaptive_kl_update(0.2, 0.0, 6.0, 512, 10000), 0.2 * (1 - 0.2 * 512 / 10000)
    )  # e clipped at −0.2
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert math.isclose(ctl.update(9.0, 512), 0.202048)
    assert math.isclose(ctl.update(9.0, 512), 0.202048 * 1.01024)
    restored = make_kl_controller(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value and restored.target == 6.0


def test_fixed_kl_coefficient_stays_fixed():
    ctl = make_kl_controller(0.05, None, 10000)
    assert isinstance(ctl, FixedKLController)
    for kl in (0.0, 6.0, 100.0):
        assert ctl.update(kl, 512) == 0.05


# ---- KL health monitor ------------------------------------------------------------------------
def test_kl_bands_and_their_boundaries():
    names = [kl_band(v).name for v in (-0.3, 0.5, 1.0, 1.5, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 20.1, NAN)]
    assert names == [
        "barely_changed",
        "barely_changed",
        "barely_changed",
        "moving",
        "moving",
        "healthy",
        "healthy",
        "elevated",
        "elevated",
        "drifting",
        "drifting",
        "divergence",
        "divergence",
    ]
    assert [b.name for b in KL_BANDS][-1] == "divergence"


def test_monitor_speaks_on_band_changes_and_stops_at_divergence():
    said = []
    monitor = KLMonitor(stop_on_divergence=True, say=said.append, temperature=0.7)
    reports = [monitor.update(kl, iteration=i) for i, kl in enumerate([0.2, 0.4, 3.0, 3.5, 12.0, 25.0])]
    assert [r.changed for r in reports] == [True, False, True, False, True, True]
    assert [r.should_stop for r in reports] == [False] * 5 + [True]
    assert len(said) == 4 and "healthy" in said[1] and "T=0.7" in said[1]
    assert "raise β or lower the learning rate" in said[2] and "stop" in said[3]
    relaxed = KLMonitor(stop_on_divergence=False, say=said.append)
    assert not relaxed.update(50.0).should_stop
