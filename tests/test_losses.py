"""Losses and advantages against hand-computed values; aggregation invariant to micro-batches and ranks.

Expected values are worked out by hand (the arithmetic is in the comments) or by explicit
Python loops over tokens written from the formulas in REFERENCE.md section 3, never by calling
the function under test.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minir1ci.training.distributed import all_reduce_sum
from minir1ci.training.losses import (
    AGG_MODES,
    aggregate,
    cispo_loss,
    gae,
    grpo_advantages,
    gspo_loss,
    kl_penalty,
    masked_whiten,
    mismatch_sums,
    policy_loss,
    sequence_in_bounds,
    step_denominator,
    tis_weights,
    value_loss,
)

T_ = torch.tensor


# ----------------------------------------------------------------------------- GRPO advantages

def test_grpo_advantages_with_std_per_group():
    scores = T_([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    # group 1: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3; group 2: all equal -> 0
    s = math.sqrt(1 / 3) + 1e-6
    torch.testing.assert_close(grpo_advantages(scores, 3), T_([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 0.0, 0.0]))
    # groups of one: mean 0, std 1 -> s / (1 + eps)
    torch.testing.assert_close(grpo_advantages(T_([2.0, -1.0]), 1), T_([2.0, -1.0]) / (1 + 1e-6))


def test_grpo_advantages_dr_grpo_without_std():
    scores = T_([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    torch.testing.assert_close(grpo_advantages(scores, 3, norm_std=False), T_([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(grpo_advantages(T_([2.0, -1.0]), 1, norm_std=False), T_([2.0, -1.0]))


def test_grpo_advantages_with_consecutive_group_size():
    # groups (1, 2) and (3, 5): means 1.5 and 4, unbiased stds sqrt(0.5) and sqrt(2)
    got = grpo_advantages(T_([1.0, 2.0, 3.0, 5.0]), 2)
    a, b = 0.5 / (math.sqrt(0.5) + 1e-6), 1.0 / (math.sqrt(2.0) + 1e-6)
    torch.testing.assert_close(got, T_([-a, a, -b, b]))
    with pytest.raises(ValueError):
        grpo_advantages(T_([1.0, 2.0, 3.0]), 2)


# ----------------------------------------------------------------------------- GAE and whitening

def test_gae_skips_masked_tokens_with_gamma_and_lambda_below_one():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    mask = T_([[0, 1, 1, 0, 0, 1, 0]])  # prompt, two model tokens, interpreter output, one model token, pad
    rewards = T_([[7.0, 0.0, 0.0, 5.0, 5.0, 1.0, 3.0]])
    values = T_([[9.0, 0.5, 0.2, 9.0, -3.0, 0.4, 8.0]])
    # t=5: delta = 1 + 0.9*0 - 0.4 = 0.6;          A = 0.6
    # t=2: delta = 0 + 0.9*0.4 - 0.2 = 0.16;       A = 0.16 + 0.72*0.6 = 0.592   (skips t=3,4)
    # t=1: delta = 0 + 0.9*0.2 - 0.5 = -0.32;      A = -0.32 + 0.72*0.592 = 0.10624
    want_adv = T_([[0.0, 0.10624, 0.592, 0.0, 0.0, 0.6, 0.0]])
    want_ret = T_([[0.0, 0.60624, 0.792, 0.0, 0.0, 1.0, 0.0]])  # A + V
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)

    # values and rewards at masked positions do not enter the recursion
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[mask == 0] = T_([-50.0, 11.0, 0.3, 100.0])
    values2[mask == 0] = T_([123.0, -7.0, 42.0, 0.0])
    adv2, ret2 = gae(rewards2, values2, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value_per_row():
    mask = T_([[1, 1, 1, 1], [1, 1, 0, 1]])
    rewards = T_([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0]])
    values = T_([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 99.0, 0.25]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    # with gamma = lam = 1, A_t = (sum of later rewards) - V_t and R_t = the reward-to-go
    torch.testing.assert_close(adv, T_([[0.9, 0.8, 0.7, 0.6], [-1.5, -0.5, 0.0, -1.25]]))
    torch.testing.assert_close(ret, T_([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 0.0, -1.0]]))


def test_masked_whiten_uses_unbiased_variance_over_mask():
    x = T_([[1.0, 2.0], [3.0, 100.0]])
    mask = T_([[1, 1], [1, 0]])
    # mean 2, unbiased var ((-1)^2 + 0 + 1^2) / 2 = 1
    k = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), T_([[-k, 0.0], [k, 0.0]]))


# ----------------------------------------------------------------------------- policy loss

# (advantage, ratio, eps_high, dual_clip_c, expected loss, d loss / d logp, clipped?)
POLICY_CASES = [
    (1.0, 1.1, 0.2, 3.0, -1.1, -1.1, False),    # inside the trust region
    (1.0, 1.5, 0.2, 3.0, -1.2, 0.0, True),      # A>0, ratio above 1+eps: clipped
    (1.0, 0.5, 0.2, 3.0, -0.5, -0.5, False),    # A>0, ratio below 1-eps: not clipped
    (-1.0, 0.5, 0.2, 3.0, 0.8, 0.0, True),      # A<0, ratio below 1-eps: clipped
    (-1.0, 1.5, 0.2, 3.0, 1.5, 1.5, False),     # A<0, ratio above: not clipped, below c
    (-1.0, 5.0, 0.2, 3.0, 3.0, 0.0, False),      # A<0, ratio above c: dual clip -> -c*A
    (-1.0, 5.0, 0.2, None, 5.0, 5.0, False),    # dual clip off
    (2.0, 5.0, 0.2, 3.0, -2.4, 0.0, True),      # dual clip never applies for A>0
    (1.0, 1.5, 0.28, 3.0, -1.28, 0.0, True),    # clip-higher: bound 1.28
    (1.0, 1.25, 0.28, 3.0, -1.25, -1.25, False),  # clipped at 0.2, free at 0.28
    (0.0, 3.0, 0.2, 3.0, 0.0, 0.0, False),      # zero advantage
]


@pytest.mark.parametrize("adv,ratio,eps_high,c,want,want_grad,clipped", POLICY_CASES)
def test_policy_loss_clip_and_dual_clip_cases(adv, ratio, eps_high, c, want, want_grad, clipped):
    old = T_([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, metrics = policy_loss(logp, old, T_([[adv]]), T_([[1]]), eps_low=0.2, eps_high=eps_high, dual_clip_c=c)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), T_([[want]]))
    torch.testing.assert_close(logp.grad, T_([[want_grad]]))  # d(-A rho)/dlogp = -A rho when unclipped
    assert metrics["clipfrac"].item() == float(clipped)


def test_policy_loss_clamps_log_ratio_and_counts_metrics_over_mask():
    old = T_([[0.0, 0.0, 0.0, 0.0]])
    logp = T_([[50.0, math.log(1.5), 0.0, math.log(1.5)]])  # the first log-ratio is clamped to 20
    adv = T_([[-1.0, 1.0, 1.0, 1.0]])
    mask = T_([[1, 1, 1, 0]])
    loss, m = policy_loss(logp, old, adv, mask, dual_clip_c=None)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss[0, 0], torch.tensor(math.exp(20.0)))
    torch.testing.assert_close(m["clipfrac"], torch.tensor(1 / 3))  # token 1 of the 3 in the mask


# ----------------------------------------------------------------------------- KL and value loss

def test_kl_estimators_hand_values():
    ref = T_([0.0, 0.0, 0.0, 0.0])
    logp = T_([0.5, -1.0, 0.0, 2.0])  # delta = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), T_([0.5, -1.0, 0.0, 2.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), T_([0.125, 0.5, 0.0, 2.0]))
    # k3 = e^-d + d - 1: e^-0.5 - 0.5, e - 2, 0, e^-2 + 1
    want = T_([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0, math.exp(-2.0) + 1.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), want)


def test_k3_gradient_and_clamp_to_ten():
    logp = T_([0.5, -30.0, -300.0, 15.0], requires_grad=True)
    kl = kl_penalty(logp, torch.zeros(4), "k3")
    kl.sum().backward()
    # e^30 + ... and e^300 clamp to 10; e^-15 + 14 clamps to 10; clamped entries get no gradient
    torch.testing.assert_close(kl.detach()[1:], T_([10.0, 10.0, 10.0]))
    torch.testing.assert_close(logp.grad, T_([1 - math.exp(-0.5), 0.0, 0.0, 0.0]))  # d k3 / d delta = 1 - e^-d


def test_value_loss_clipped_cases():
    values = T_([1.0, 1.0, 0.2, -1.0])
    old = T_([0.0, 0.0, 0.0, 0.0])
    returns = T_([0.0, 2.0, 1.0, -3.0])
    # V clipped to old +- 0.5:
    # (1-0)^2=1 vs (0.5-0)^2=.25 -> .5;  (1-2)^2=1 vs (.5-2)^2=2.25 -> 1.125;
    # (.2-1)^2=.64 both -> .32;          (-1+3)^2=4 vs (-.5+3)^2=6.25 -> 3.125
    loss, m = value_loss(values, old, returns, clip=0.5, mask=T_([1, 1, 1, 1]))
    torch.testing.assert_close(loss, T_([0.5, 1.125, 0.32, 3.125]))
    torch.testing.assert_close(m["vf_clipfrac"], torch.tensor(0.5))
    _, m = value_loss(values, old, returns, clip=0.5, mask=T_([1, 1, 1, 0]))
    torch.testing.assert_close(m["vf_clipfrac"], torch.tensor(1 / 3))


def _all_losses(logp, values, mask, mode):
    """Policy + k3 KL + entropy-like (-logp) + value loss, all aggregated with the one mask."""
    old, ref, adv = torch.full((2, 3), -1.0), torch.full((2, 3), -1.2), T_([[1.0, -1.0, 0.5], [-2.0, 1.0, 1.0]])
    pg, _ = policy_loss(logp, old, adv, mask)
    vl, _ = value_loss(values, torch.zeros(2, 3), torch.ones(2, 3), 0.5, mask)
    denom = step_denominator(mask, mode, max_len=4)
    return sum(aggregate(x, mask, mode, denom) for x in (pg, kl_penalty(logp, ref, "k3"), -logp, vl))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_values_at_masked_positions_change_no_loss_and_no_gradient(mode):
    mask = T_([[1, 0, 1], [0, 1, 1]])
    clean_logp, clean_values = T_([[-1.0, 0.0, -0.5], [0.0, -2.0, -0.1]]), T_([[0.3, 0.0, 0.1], [0.0, 0.2, 0.0]])
    junk = T_([[0.0, 37.0, 0.0], [-500.0, 0.0, 0.0]])  # garbage where mask is 0
    out = []
    for logp, values in ((clean_logp, clean_values), (clean_logp + junk, clean_values - junk)):
        logp, values = logp.clone().requires_grad_(), values.clone().requires_grad_()
        total = _all_losses(logp, values, mask, mode)
        total.backward()
        out.append((total.detach(), logp.grad, values.grad))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y)
    assert torch.all(out[1][1][mask == 0] == 0) and torch.all(out[1][2][mask == 0] == 0)
    # the forward pass even tolerates NaN / inf there (torch.where, not multiplication by the mask)
    nan_logp = clean_logp + T_([[0.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0]])
    torch.testing.assert_close(_all_losses(nan_logp, clean_values, mask, mode), out[0][0])


# ----------------------------------------------------------------------------- aggregation

def test_aggregation_modes_hand_values():
    loss = T_([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = T_([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the third row is empty and counts nowhere
    want = {
        "token-mean": 10 / 4,  # (1+2+3+4) / 4 tokens
        "seq-mean-token-mean": (2.0 + 4.0) / 2,  # row means 2 and 4
        "seq-mean-token-sum": (6.0 + 4.0) / 2,  # row sums 6 and 4
        "seq-mean-token-sum-norm": 10 / (2 * 5),  # C = 5
    }
    for mode, value in want.items():
        denom = step_denominator(mask, mode, max_len=5)
        torch.testing.assert_close(aggregate(loss, mask, mode, denom), torch.tensor(value))


def test_step_denominator_counts_tokens_or_non_empty_rows():
    mask = T_([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert step_denominator(mask, "token-mean").item() == 6
    assert step_denominator(mask, "seq-mean-token-mean").item() == 2
    assert step_denominator(mask, "seq-mean-token-sum-norm", max_len=8).item() == 16
    assert all_reduce_sum(torch.tensor(6.0)).item() == 6  # no process group: unchanged


MAX_LEN = 10
LENGTHS_MASK = [  # ragged responses with interpreter output (0s) inside; one row empty
    [0, 1, 1, 0, 0, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [0, 0, 1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 0, 0],
]


def _batch():
    g = torch.Generator().manual_seed(0)
    B, T, D = 6, 8, 3
    feats = torch.randn(B, T, D, generator=g)
    old = -torch.rand(B, T, generator=g) - 0.5
    ref = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.tensor(LENGTHS_MASK)
    return feats, old, ref, adv, mask


def _loss_tok(theta, feats, old, ref, adv, mask):
    """A toy policy: logp = -softplus(feats @ theta); PPO loss plus a k3 KL term, per token."""
    logp = -torch.nn.functional.softplus(feats @ theta)  # [B, T]
    pg, _ = policy_loss(logp, old, adv, mask, eps_high=0.28)
    return pg + 0.1 * kl_penalty(logp, ref, "k3")


def _reference_loss(loss_tok, mask, mode):
    """The global-batch loss written per REFERENCE.md section 3, with explicit loops."""
    rows = []  # (sum, count) for each row with a loss token
    for i in range(mask.shape[0]):
        terms = [loss_tok[i, t] for t in range(mask.shape[1]) if mask[i, t]]
        if terms:
            rows.append((sum(terms), len(terms)))
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / len(rows)
    return sum(s for s, _ in rows) / (len(rows) * MAX_LEN)


def _reference_loss_and_grad(mode):
    feats, old, ref, adv, mask = _batch()
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    loss = _reference_loss(_loss_tok(theta, feats, old, ref, adv, mask), mask, mode)
    loss.backward()
    return loss.detach(), theta.grad


def _microbatch_loss_and_grad(mode, splits, rows=None):
    """Sum of per-micro-batch losses over a step denominator; each micro-batch trimmed to its own length."""
    feats, old, ref, adv, mask = _batch()
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    mbs = []
    for idx in splits:
        idx = torch.tensor(idx)
        m = mask[idx]
        t_len = int(m.any(0).nonzero().max()) + 1 if m.any() else 1  # drop trailing padding
        mbs.append((feats[idx, :t_len], old[idx, :t_len], ref[idx, :t_len], adv[idx, :t_len], m[:, :t_len]))
    denom = all_reduce_sum(sum(step_denominator(mb[-1], mode, max_len=MAX_LEN) for mb in mbs))
    total = torch.zeros(())
    for mb in mbs:
        loss = aggregate(_loss_tok(theta, *mb), mb[-1], mode, denom)
        loss.backward()  # gradient accumulation, one micro-batch at a time
        total += loss.detach()
    return total, theta.grad


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("splits", [
    [[0, 1, 2, 3, 4, 5]],
    [[0, 1, 2], [3, 4, 5]],
    [[0], [1, 2], [3, 4, 5]],
    [[4, 1], [3], [5, 0, 2]],
])
def test_microbatch_split_leaves_loss_and_gradient_unchanged(mode, splits):
    want_loss, want_grad = _reference_loss_and_grad(mode)
    loss, grad = _microbatch_loss_and_grad(mode, splits)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # rank 0 holds rows 0-2 in two micro-batches, rank 1 rows 3-5 (including the empty row) in one
        splits = [[[0], [1, 2]], [[3, 4, 5]]][rank]
        results = {}
        for mode in AGG_MODES:
            loss, grad = _microbatch_loss_and_grad(mode, splits)
            dist.all_reduce(loss)  # SUM: logging the global loss
            dist.all_reduce(grad)  # SUM: what the optimizer step sees
            results[mode] = (loss, grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_leave_loss_and_gradient_unchanged(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in AGG_MODES:
            want_loss, want_grad = _reference_loss_and_grad(mode)
            loss, grad = results[mode]
            torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- fixes found by the veRL cross-check

def test_a_group_of_equal_rewards_gets_exactly_zero_advantage():
    # 0.7 * 8 summed in fp32 is not 5.6 exactly: the mean's rounding over a ~1e-8 std gave |A| up to 0.056
    flat = torch.full((8,), 0.7)
    assert torch.equal(grpo_advantages(flat, 8), torch.zeros(8))
    assert torch.equal(grpo_advantages(flat, 8, norm_std=False), torch.zeros(8))
    # beside a group with signal, that group is unchanged: (1, 0, 1, 0, ...) -> mean 0.5, unbiased std
    got = grpo_advantages(torch.cat([flat, T_([1.0, 0.0] * 4)]), 8)
    a = 0.5 / (math.sqrt(2 / 7) + 1e-6)
    assert torch.equal(got[:8], torch.zeros(8))
    torch.testing.assert_close(got[8:], T_([a, -a] * 4))


def test_vf_clipfrac_counts_only_values_really_clipped():
    # |V - V_old| = 0.2605 < 0.5: nothing is clipped, though old + (V - old) != V in fp32
    v, v_old = T_([[0.03214354068040848]]), T_([[-0.22835837304592133]])
    loss, m = value_loss(v, v_old, torch.zeros(1, 1), clip=0.5, mask=T_([[1]]))
    assert float(m["vf_clipfrac"]) == 0.0
    torch.testing.assert_close(loss, 0.5 * v**2)
    # really clipped: V = 1, V_old = 0, R = 2 -> clipped V = 0.5, (0.5 - 2)^2 = 2.25 > (1 - 2)^2 = 1
    loss, m = value_loss(T_([[1.0]]), T_([[0.0]]), T_([[2.0]]), clip=0.5, mask=T_([[1]]))
    assert float(m["vf_clipfrac"]) == 1.0 and float(loss) == pytest.approx(1.125)


def test_aggregate_takes_a_denominator_divided_by_the_world_size():
    # 3 loss tokens over 4 ranks whose gradients are averaged: denom 3 / 4 = 0.75 turns the mean into a sum
    loss, mask = T_([[1.0, 2.0, 4.0, 9.0]]), T_([[1, 1, 1, 0]])
    assert float(aggregate(loss, mask, "token-mean", T_(0.75))) == pytest.approx(7.0 / 0.75)
    # no loss token anywhere: 0, not NaN
    assert float(aggregate(loss, torch.zeros_like(mask), "token-mean", T_(0.0))) == 0.0


# ----------------------------------------------------------------------------- sampler/trainer mismatch

def test_tis_weights_are_capped_detached_and_zero_off_the_mask():
    # pi_old / mu: 0.4 / 0.5 = 0.8 (kept), 0.9 / 0.3 = 3 (capped to 2), masked, e^5 (capped)
    old = torch.log(T_([[0.4, 0.9, 0.7, 1.0]])).requires_grad_()
    mu = torch.log(T_([[0.5, 0.3, 0.1, math.exp(-5.0)]]))
    w = tis_weights(old, mu, T_([[1, 1, 0, 1]]), cap=2.0)
    torch.testing.assert_close(w, T_([[0.8, 2.0, 0.0, 2.0]]))
    assert not w.requires_grad
    torch.testing.assert_close(tis_weights(old, mu, T_([[1, 1, 0, 1]]), cap=10.0), T_([[0.8, 3.0, 0.0, 10.0]]))


def test_sequence_masking_by_the_geometric_mean_ratio():
    l3, l4 = math.log(3.0), math.log(4.0)
    mu = torch.zeros(5, 2)
    old = T_([[l3, 0.0], [l4, l4], [-l4, -l4], [math.log(1.5), 100.0], [0.0, 0.0]])
    mask = T_([[1, 1], [1, 1], [1, 1], [1, 0], [0, 0]])
    # ratios: sqrt(3) = 1.73 in; 4 out; 0.25 out; 1.5 (the masked 100 does not count) in; empty row 1 in
    assert sequence_in_bounds(old, mu, mask, 0.5, 2.0).tolist() == [True, False, False, True, True]
    assert sequence_in_bounds(old, mu, mask, 0.5, 0.0).tolist() == [True, True, False, True, True]  # high open
    assert sequence_in_bounds(old, mu, mask, 0.0, 2.0).tolist() == [True, False, True, True, True]  # low open


def test_mismatch_sums_hand_values():
    # r = pi_old / mu = 2.5, 1, 1/3 (and a masked token that must not count)
    old = torch.log(T_([[0.5, 0.9, 0.1, 0.9]]))
    mu = torch.log(T_([[0.2, 0.9, 0.3, 0.01]]))
    got = mismatch_sums(old, mu, T_([[1, 1, 1, 0]]))
    k3 = (2.5 - 1 - math.log(2.5)) + 0.0 + (1 / 3 - 1 + math.log(3.0))   # r - 1 - log r
    want = {"mismatch_kl": k3, "mismatch_abs": math.log(2.5) + math.log(3.0),
            "mismatch_frac_out": 2.0, "mismatch_tokens": 3.0}             # 2.5 and 1/3 lie outside [0.5, 2]
    assert got.keys() == want.keys() and all(v.dtype == torch.float64 for v in got.values())
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- GSPO and CISPO

def test_gspo_one_clipped_ratio_per_sequence():
    old = torch.zeros(2, 3)
    logp = T_([[0.1, 0.3, 7.0], [-0.02, 0.0, -9.0]]).requires_grad_()   # the third token of each row is masked
    mask = T_([[1, 1, 0], [1, 1, 0]])
    adv = T_([[1.0, 1.0, 0.0], [-2.0, -2.0, 0.0]])
    loss, m = gspo_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.1)
    # row 0: s = e^0.2 = 1.2214 > 1.1, A = 1: max(-1.2214, -1.1) = -1.1, clipped (no gradient)
    # row 1: s = e^-0.01 = 0.99005, A = -2: 2 * 0.99005 = 1.9801, inside the clip range
    s1 = math.exp(-0.01)
    torch.testing.assert_close(loss, T_([[-1.1, -1.1, 0.0], [2 * s1, 2 * s1, 0.0]]))
    assert float(m["clipfrac"]) == pytest.approx(0.5)
    # mean over sequences (seq-mean-token-mean): d/dlogp_1t = 1/2 * (-A) * s * 1/|y| = 0.5 * 2 * s1 * 0.5
    aggregate(loss, mask, "seq-mean-token-mean", T_(2.0)).backward()
    torch.testing.assert_close(logp.grad, T_([[0.0, 0.0, 0.0], [0.5 * s1, 0.5 * s1, 0.0]]))


def test_cispo_weight_is_clipped_and_detached_so_every_token_keeps_a_gradient():
    logp = T_([[-1.0, -2.0]]).requires_grad_()
    old = T_([[-1.5, -1.9]])        # rho = e^0.5 = 1.6487 (clipped to 1.2), e^-0.1 = 0.9048 (inside)
    adv, mask = T_([[1.0, -1.0]]), T_([[1, 1]])
    loss, m = cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    w1 = math.exp(-0.1)
    torch.testing.assert_close(loss, T_([[-1.2 * 1.0 * -1.0, -w1 * -1.0 * -2.0]]))   # -w * A * log pi
    assert float(m["clipfrac"]) == pytest.approx(0.5)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, T_([[-1.2, w1]]))                        # -w * A
    # the clipped PPO loss gives the first token no gradient at all
    logp2 = logp.detach().requires_grad_()
    policy_loss(logp2, old, adv, mask, 0.2, 0.2)[0].sum().backward()
    assert float(logp2.grad[0, 0]) == 0.0
