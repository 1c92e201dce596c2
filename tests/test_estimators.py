"""Critic-free advantage estimators (RLOO, GRPO, REINFORCE++) and the KL loss term, against hand-computed numbers.

The running example: 2 prompts × 3 responses, a prompt's responses contiguous
[p0r0, p0r1, p0r2, p1r0, p1r1, p1r2], sequence rewards R = [1, 2, 6 | 4, 0, 2],
response lengths [3, 1, 2 | 2, 3, 1] in 3 token slots (padding after each response).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tether.config import ConfigError
from tether.ppo.advantages import (
    grpo_advantages,
    masked_std,
    reinforce_pp_advantages,
    rloo_advantages,
    token_advantages,
)
from tether.ppo.losses import kl_loss_term, policy_loss

NAN = float("nan")
R = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, 2.0])
LENGTHS = torch.tensor([3, 1, 2, 2, 3, 1])
MASK = torch.arange(3).unsqueeze(0) < LENGTHS.unsqueeze(1)  # [6, 3]
# two rewards missing in group 0 and group 1, written as NaN where missing (must not leak)
R_NONE = torch.tensor([1.0, NAN, 6.0, 4.0, NAN, NAN])
VALID = torch.tensor([True, False, True, True, False, False])


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0
    )


def expand(seq, lengths=LENGTHS, width=3):
    """Hand-broadcast: row i holds seq[i] on its first lengths[i] slots, 0 after."""
    return torch.tensor([[seq[i] if t < lengths[i] else 0.0 for t in range(width)] for i in range(len(seq))])


# ---- RLOO -----------------------------------------------------------------------------------------
def test_rloo_by_hand_with_padding():
    # group 0 [1, 2, 6]: 1 − (2+6)/2 = −3;  2 − (1+6)/2 = −1.5;  6 − (1+2)/2 = 4.5
    # group 1 [4, 0, 2]: 4 − (0+2)/2 = 3;   0 − (4+2)/2 = −3;    2 − (4+0)/2 = 0
    expected = [-3.0, -1.5, 4.5, 3.0, -3.0, 0.0]
    advantages = rloo_advantages(R, 3)
    assert close(advantages, expected)
    per_token = token_advantages(advantages, MASK)
    # row 0 (3 tokens): −3 −3 −3; row 1 (1 token): −1.5 0 0; row 2 (2 tokens): 4.5 4.5 0; ...
    assert close(per_token, expand(expected))
    assert close(per_token[1], [-1.5, 0.0, 0.0]) and close(per_token[4], [-3.0, -3.0, -3.0])


def test_rloo_missing_rewards():
    # group 0 valid {1, 6} (k=2): 1 − 6/1 = −5, 6 − 1/1 = 5, the missing one 0
    # group 1 valid {4} only: fewer than 2 valid → no baseline → all 0
    advantages = rloo_advantages(R_NONE, 3, valid=VALID)
    assert close(advantages, [-5.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    assert close(token_advantages(advantages, MASK), expand([-5.0, 0.0, 5.0, 0.0, 0.0, 0.0]))


# ---- GRPO -----------------------------------------------------------------------------------------
def test_grpo_group_scale_by_hand():
    # group 0: mean 3, deviations [−2, −1, 3], unbiased var (4 + 1 + 9)/2 = 7, std √7 = 2.6457513
    # group 1: mean 2, deviations [2, −2, 0], unbiased var (4 + 4 + 0)/2 = 4, std 2
    s0, s1 = math.sqrt(7) + 1e-4, 2.0 + 1e-4
    expected = [-2 / s0, -1 / s0, 3 / s0, 2 / s1, -2 / s1, 0.0]  # [−0.75592, −0.37796, 1.13389, 0.99995, −0.99995, 0]
    advantages = grpo_advantages(R, 3, "group")
    assert close(advantages, expected)
    assert close(advantages[:4], [-0.7559004, -0.3779502, 1.1338506, 0.99995], tol=1e-6)
    assert close(token_advantages(advantages, MASK), expand(expected))


def test_grpo_batch_scale_by_hand():
    # group means as above (3 and 2); std over all six rewards [1, 2, 6, 4, 0, 2]: mean 15/6 = 2.5,
    # deviations [−1.5, −0.5, 3.5, 1.5, −2.5, −0.5], squares sum 2.25+0.25+12.25+2.25+6.25+0.25 = 23.5,
    # unbiased var 23.5/5 = 4.7, std √4.7 = 2.1679483
    s = math.sqrt(4.7) + 1e-4
    expected = [-2 / s, -1 / s, 3 / s, 2 / s, -2 / s, 0.0]
    advantages = grpo_advantages(R, 3, "batch")
    assert close(advantages, expected)
    assert close(advantages[2], 1.3837330, tol=1e-6)  # 3 / 2.1680483
    assert close(token_advantages(advantages, MASK), expand(expected))


def test_grpo_no_scale_is_dr_grpo():
    # R − group mean: [1−3, 2−3, 6−3, 4−2, 0−2, 2−2]; eps has no effect without a division
    expected = [-2.0, -1.0, 3.0, 2.0, -2.0, 0.0]
    assert close(grpo_advantages(R, 3, "none"), expected)
    assert close(grpo_advantages(R, 3, "none", eps=10.0), expected)
    assert close(token_advantages(grpo_advantages(R, 3, "none"), MASK), expand(expected))


def test_grpo_missing_rewards_each_scale():
    # group 0 valid {1, 6}: mean 3.5, deviations −2.5, +2.5, unbiased var (6.25+6.25)/1 = 12.5
    # group 1 valid {4}: its own mean → deviation 0 (std over one value is taken as 0: 0/(0+ε) = 0)
    s_group = math.sqrt(12.5) + 1e-4
    assert close(grpo_advantages(R_NONE, 3, "group", valid=VALID), [-2.5 / s_group, 0, 2.5 / s_group, 0, 0, 0])
    # batch std over valid {1, 6, 4}: mean 11/3, deviations −8/3, 7/3, 1/3, squares (64+49+1)/9 = 114/9,
    # unbiased var 114/9/2 = 19/3
    s_batch = math.sqrt(19 / 3) + 1e-4
    assert close(grpo_advantages(R_NONE, 3, "batch", valid=VALID), [-2.5 / s_batch, 0, 2.5 / s_batch, 0, 0, 0])
    assert close(grpo_advantages(R_NONE, 3, "none", valid=VALID), [-2.5, 0, 2.5, 0, 0, 0])


def test_masked_std_is_unbiased_like_torch_std():
    x = torch.tensor([1.0, 2.0, 6.0, 4.0, 0.0, 2.0])
    assert close(masked_std(x, torch.ones(6, dtype=torch.bool)), math.sqrt(4.7))
    assert close(masked_std(x, torch.ones(6, dtype=torch.bool)), x.std())
    assert close(masked_std(x, torch.tensor([1, 0, 0, 0, 0, 0])), 0.0)  # one value: 0, not NaN


@pytest.mark.parametrize("estimator", [rloo_advantages, grpo_advantages])
def test_one_generation_per_prompt_is_refused_naming_the_flag(estimator):
    with pytest.raises(ConfigError, match=r"--num_generations to 2 or more \(got 1\)"):
        estimator(R, 1)
    with pytest.raises(ValueError, match="not a whole number of groups of --num_generations 4"):
        estimator(R, 4)


def test_grpo_unknown_scale_names_the_flag():
    with pytest.raises(ValueError, match="--scale_rewards 'std'"):
        grpo_advantages(R, 3, "std")


# ---- REINFORCE++ ----------------------------------------------------------------------------------
# token rewards (−β·KL plus the score at the stop token), padding full of junk that must not leak
TOKEN_REWARDS = torch.tensor(
    [
        [1.0, -1.0, 2.0],  # len 3: G = [2, 1, 2]
        [3.0, 9.0, NAN],  # len 1: G = [3]
        [-1.0, 1.0, 9.0],  # len 2: G = [0, 1]
        [2.0, 2.0, NAN],  # len 2: G = [4, 2]
        [0.0, 0.0, 0.0],  # len 3: G = [0, 0, 0]
        [1.0, 5.0, 5.0],  # len 1: G = [1]
    ]
)
RETURNS = [[2, 1, 2], [3], [0, 1], [4, 2], [0, 0, 0], [1]]


def by_rows(rows, width=3):
    return torch.tensor([list(map(float, r)) + [0.0] * (width - len(r)) for r in rows])


def test_reinforce_pp_by_hand_with_padding():
    # 12 real returns 2,1,2,3,0,1,4,2,0,0,0,1: sum 16, μ = 4/3;
    # 9·(G − μ) = 2,−1,2,5,−4,−1,8,2,−4,−4,−4,−1 → squares 4+1+4+25+16+1+64+4+16+16+16+1 = 168
    # biased σ² = 168/81/12 = 14/9
    mu, sd = 4 / 3, math.sqrt(14 / 9 + 1e-8)
    expected = by_rows([[(g - mu) / sd for g in row] for row in RETURNS])
    advantages = reinforce_pp_advantages(TOKEN_REWARDS, MASK)
    assert close(advantages, expected)
    assert close(advantages[0], [(2 - mu) / sd, (1 - mu) / sd, (2 - mu) / sd])  # [0.53452, −0.26726, 0.53452]
    assert close(advantages[0, 0], 0.5345225, tol=1e-6)
    assert (advantages[~MASK] == 0).all()


def test_reinforce_pp_missing_reward_rows_are_left_out():
    valid = torch.tensor([True, True, True, True, False, True])  # row 4's score is missing
    # 9 real returns 2,1,2,3,0,1,4,2,1: sum 16, μ = 16/9;
    # 9·(G − μ) = 2,−7,2,11,−16,−7,20,2,−7 → squares 4+49+4+121+256+49+400+4+49 = 936; σ² = 936/81/9 = 104/81
    mu, sd = 16 / 9, math.sqrt(104 / 81 + 1e-8)
    rows = [[(g - mu) / sd for g in row] for row in RETURNS]
    rows[4] = [0.0, 0.0, 0.0]
    assert close(reinforce_pp_advantages(TOKEN_REWARDS, MASK, valid=valid), by_rows(rows))


# ---- multi-process: the batch statistics are global ----------------------------------------------
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def all_reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    share = slice(3 * rank, 3 * rank + 3)  # each rank holds one whole group
    torch.save(
        {
            "grpo_batch": grpo_advantages(R_NONE[share], 3, "batch", valid=VALID[share], all_reduce=all_reduce),
            "reinforce_pp": reinforce_pp_advantages(TOKEN_REWARDS[share], MASK[share], all_reduce=all_reduce),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_advantages(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole_grpo = grpo_advantages(R_NONE, 3, "batch", valid=VALID)
    whole_rpp = reinforce_pp_advantages(TOKEN_REWARDS, MASK)
    assert close(torch.cat([r["grpo_batch"] for r in ranks]), whole_grpo)
    assert close(torch.cat([r["reinforce_pp"] for r in ranks]), whole_rpp)


# ---- KL as a loss term (GRPO) ---------------------------------------------------------------------
def test_kl_loss_term_by_hand_and_consistent_with_policy_loss():
    # d = logp − ref_logp on real tokens: row 0 [0.5, −0.5, 0], row 1 [1.0, pad, pad]
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.5, 50.0, NAN]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, -0.3], [-1.5, -90.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    beta = 0.1
    # k3(d) = exp(−d) − 1 + d:  k3(0.5) = e^−0.5 − 0.5 = 0.10653066,  k3(−0.5) = e^0.5 − 1.5 = 0.14872127,
    #                           k3(0) = 0,  k3(1) = e^−1 = 0.36787944;  4 real tokens
    k3 = [math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0, math.exp(-1.0)]
    loss = kl_loss_term(logp, ref, mask, beta)
    assert close(loss, beta * sum(k3) / 4)
    assert close(loss, 0.1 * 0.62313137 / 4, tol=1e-7)
    # gradient β·(1 − e^−d)/n on real tokens, exactly 0 on padding (junk there leaks nowhere)
    loss.backward()
    n = 4
    expected_grad = [
        [beta * (1 - math.exp(-0.5)) / n, beta * (1 - math.exp(0.5)) / n, 0.0],
        [beta * (1 - math.exp(-1.0)) / n, 0.0, 0.0],
    ]
    assert close(logp.grad, expected_grad)
    # averaged like the policy loss: with the minibatch's token count as denominator, the micro-batch
    # pieces (row 0, row 1) sum to the whole-batch value, as policy_loss's do
    pieces = [kl_loss_term(logp[i : i + 1], ref[i : i + 1], mask[i : i + 1], beta, denominator=4) for i in (0, 1)]
    assert close(sum(pieces), loss)
    adv, old = torch.ones(2, 3), logp.detach()
    pg_pieces = [
        policy_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], denominator=4) for i in (0, 1)
    ]
    assert close(sum(p.loss for p in pg_pieces), policy_loss(logp, old, adv, mask).loss)


def test_kl_loss_term_is_zero_for_the_reference_itself():
    logp = torch.tensor([[-1.0, -2.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert kl_loss_term(logp, logp.clone(), mask, beta=0.5).item() == 0.0
