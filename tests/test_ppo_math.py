"""PPO math checked against values computed by hand (see the comments for each derivation)."""

import math

import numpy as np
import pytest
import torch

from agents.ppo import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    episode_gae,
    explained_variance,
    gae,
    kl_per_token,
    token_discounts,
    token_rewards,
)

# One episode: action 1 has 2 tokens and env reward 1, action 2 has 1 token and env reward 2, then it terminates.
LENGTHS, ENV_REWARDS = [2, 1], [1.0, 2.0]
KL = np.array([0.1, 0.2, 0.3])
VALUES = np.array([0.5, 1.0, 1.5])
BETA, GAMMA, LAM = 0.5, 0.9, 0.8


def test_token_rewards_put_env_reward_on_last_token_and_penalise_every_token():
    # -β·kl per token, +R on the last: [-0.05, -0.1 + 1]
    np.testing.assert_allclose(token_rewards(KL[:2], 1.0, BETA), [-0.05, 0.9])


def test_token_discounts_naive_vs_decomposed():
    np.testing.assert_allclose(token_discounts(3, 0.9, decomposed=False, end=0.9), [0.9, 0.9, 0.9])
    np.testing.assert_allclose(token_discounts(3, 0.9, decomposed=True, end=0.9), [1.0, 1.0, 0.9])
    np.testing.assert_allclose(token_discounts(2, 0.9, decomposed=True, end=0.0), [1.0, 0.0])


def test_gae_naive_token_level_backup_by_hand():
    # token rewards r = [-0.05, 0.9, 1.85]; discounts d = [0.9, 0.9, 0] (terminal)
    # δ2 = 1.85 - 1.5 = 0.35                      A2 = 0.35
    # δ1 = 0.9 + 0.9·1.5 - 1.0 = 1.25             A1 = 1.25 + 0.9·0.8·0.35 = 1.502
    # δ0 = -0.05 + 0.9·1.0 - 0.5 = 0.35           A0 = 0.35 + 0.72·1.502 = 1.43144
    rewards, adv, ret = episode_gae(LENGTHS, ENV_REWARDS, KL, VALUES, kl_coef=BETA, gamma=GAMMA, lam=LAM,
                                    decomposed=False, terminated=True)
    np.testing.assert_allclose(rewards, [-0.05, 0.9, 1.85])
    np.testing.assert_allclose(adv, [1.43144, 1.502, 0.35])
    np.testing.assert_allclose(ret, [1.93144, 2.502, 1.85])


def test_gae_action_decomposed_backup_by_hand():
    # discounts d = [1, 0.9, 0]: no discount inside action 1, γ from its last token to action 2.
    # A2 = 0.35, A1 = 1.502 as above; δ0 = -0.05 + 1·1.0 - 0.5 = 0.45, A0 = 0.45 + 1·0.8·1.502 = 1.6516
    _, adv, ret = episode_gae(LENGTHS, ENV_REWARDS, KL, VALUES, kl_coef=BETA, gamma=GAMMA, lam=LAM,
                              decomposed=True, terminated=True)
    np.testing.assert_allclose(adv, [1.6516, 1.502, 0.35])
    np.testing.assert_allclose(ret, [2.1516, 2.502, 1.85])


@pytest.mark.parametrize("decomposed, expected_return0", [
    (False, -0.05 + 0.9 * 0.9 + 0.9 ** 2 * 1.85),  # every token discounts: 2.2585
    (True, -0.05 + 1.0 * 0.9 + 0.9 * 1.85),         # only the action boundary discounts: 2.515
])
def test_lambda_one_gives_monte_carlo_returns_whatever_the_values(decomposed, expected_return0):
    _, _, ret = episode_gae(LENGTHS, ENV_REWARDS, KL, np.array([7.0, -3.0, 11.0]), kl_coef=BETA, gamma=GAMMA,
                            lam=1.0, decomposed=decomposed, terminated=True)
    assert ret[0] == pytest.approx(expected_return0)
    assert ret[2] == pytest.approx(1.85)


def test_lambda_in_action_sets_the_trace_between_tokens_and_lam_between_actions():
    # decomposed backup, λ_in = 1 inside action 1 and λ = 0.8 from it to action 2: A2 = 0.35, A1 = 1.502 (action 1's
    # last token, whose trace to action 2 decays by λ = 0.8), A0 = δ0 + 1·1·A1 = 0.45 + 1.502 = 1.952.
    _, adv, _ = episode_gae(LENGTHS, ENV_REWARDS, KL, VALUES, kl_coef=BETA, gamma=GAMMA, lam=LAM,
                            decomposed=True, terminated=True, lam_in_action=1.0)
    np.testing.assert_allclose(adv, [1.952, 1.502, 0.35])
    # λ_in = 0 cuts the trace inside an action only: A0 = δ0 = 0.45
    _, adv, _ = episode_gae(LENGTHS, ENV_REWARDS, KL, VALUES, kl_coef=BETA, gamma=GAMMA, lam=LAM,
                            decomposed=True, terminated=True, lam_in_action=0.0)
    np.testing.assert_allclose(adv, [0.45, 1.502, 0.35])


def test_a_reward_two_hundred_tokens_later_reaches_the_first_token_only_with_lambda_in_action_one():
    n = 200
    kl, values = np.zeros(n), np.zeros(n)
    for lam_in, first in ((1.0, 1.0), (0.95, 0.95 ** 199)):
        _, adv, _ = episode_gae([n], [1.0], kl, values, kl_coef=0.0, gamma=GAMMA, lam=0.95, decomposed=True,
                                terminated=True, lam_in_action=lam_in)
        assert adv[0] == pytest.approx(first) and adv[-1] == pytest.approx(1.0)


def test_truncated_chain_bootstraps_from_next_state_value():
    # Not terminated: the last discount is γ and V(s') = 3 enters δ2 = 1.85 + 0.9·3 - 1.5 = 3.05.
    _, adv, _ = episode_gae(LENGTHS, ENV_REWARDS, KL, VALUES, kl_coef=BETA, gamma=GAMMA, lam=LAM,
                            decomposed=True, terminated=False, bootstrap_value=3.0)
    assert adv[2] == pytest.approx(3.05)
    assert adv[1] == pytest.approx(1.25 + 0.72 * 3.05)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        gae(np.zeros(3), np.zeros(2), np.zeros(3), 0.9)


def test_kl_estimators_by_hand_and_unbiased_on_an_enumerable_distribution():
    # π(token) = 0.5, ρ(token) = 0.25: k1 = log 2, k3 = (0.5 - 1) - log 0.5
    assert kl_per_token(np.log([0.5]), np.log([0.25]), "k1")[0] == pytest.approx(math.log(2))
    assert kl_per_token(np.log([0.5]), np.log([0.25]), "k3")[0] == pytest.approx(-0.5 + math.log(2))
    # E_π[k] over all tokens equals the exact KL(π‖ρ) for both estimators; k3 is never negative.
    pi, rho = np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.1, 0.3])
    exact = float(np.sum(pi * np.log(pi / rho)))
    for estimator in ("k1", "k3"):
        assert float(np.sum(pi * kl_per_token(np.log(pi), np.log(rho), estimator))) == pytest.approx(exact)
    assert (kl_per_token(np.log(pi), np.log(rho), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(np.log(pi), np.log(rho), "k2")


def test_clipped_policy_objective_on_a_hand_computed_batch():
    # ratios [1.5, 0.5, 1.1, 0.9] with advantages [1, 1, -1, -1], ε = 0.2; a fifth token is padding.
    # min(r·A, clip(r)·A) = [min(1.5, 1.2), min(0.5, 0.8), -1.1, -0.9] = [1.2, 0.5, -1.1, -0.9] -> loss = 0.075
    old = torch.log(torch.full((5,), 0.5))
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.9, 100.0])
    new = (old + torch.log(ratios)).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 50.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, stats = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.075)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)  # tokens 1 (1.5) and 2 (0.5) left [0.8, 1.2]
    # approx-KL = mean((r - 1) - log r) over the four valid tokens
    expected_kl = np.mean([(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.9)])
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # ∂loss/∂logp = -r·A/4 where the unclipped term is active, 0 where clipping binds (token 1) and for padding.
    np.testing.assert_allclose(new.grad.numpy(), [0.0, -0.125, 0.275, 0.225, 0.0], atol=1e-6)


def test_clipped_value_loss_by_hand():
    # V = [1, 2], V_old = [1.5, 1.5], G = [0, 3], ε_v = 0.2: clipped V = [1.3, 1.7]
    # max((1-0)², (1.3-0)²) = 1.69; max((2-3)², (1.7-3)²) = 1.69 -> ½·1.69
    v, old, ret, mask = (torch.tensor(x) for x in ([1.0, 2.0], [1.5, 1.5], [0.0, 3.0], [1.0, 1.0]))
    assert clipped_value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.845)
    assert clipped_value_loss(v, old, ret, mask, clip=None).item() == pytest.approx(0.5)


def test_explained_variance_by_hand():
    # Var([1,2,4]) = 14/9, Var(residual [0,0,1]) = 2/9 -> 1 - 1/7
    assert explained_variance(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(6 / 7)
    assert explained_variance(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(1.0)
    assert math.isnan(explained_variance(np.zeros(3), np.ones(3)))


def test_adaptive_kl_controller_moves_beta_towards_target():
    # error = clip(12/6 - 1, ±0.2) = 0.2; β·(1 + 0.2·1000/10000) = 0.1·1.02
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.102)
    assert ctl.update(6.0, 1000) == pytest.approx(0.102)
    assert ctl.update(0.0, 1000) == pytest.approx(0.102 * 0.98)
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(100.0, 1000) == 0.1


def _transition(n, reward, terminated, next_index, values, kl_logp=0.0):
    from agents.rollout import Transition

    return Transition(obs_ids=np.zeros(1, np.int32), action_ids=np.zeros(n, np.int32),
                      logp=np.full(n, kl_logp, np.float32), ref_logp=np.zeros(n, np.float32), reward=reward,
                      terminated=terminated, truncated=False, episode_id=0, t=0, next_index=next_index,
                      old_logp=np.full(n, kl_logp, np.float32), values=np.asarray(values, np.float32))


def test_buffer_advantages_follow_interleaved_episode_chains_and_bootstrap_cut_ones():
    """Two episodes interleaved as a vector env collects them: A = [0 -> 2] terminates, B = [1 -> 3] is cut by the
    end of the rollout and bootstraps from V(s') = 3. Each must equal `episode_gae` on its own token sequence."""
    from agents.ppo import compute_advantages

    transitions = [
        _transition(2, 1.0, False, 2, [0.5, 1.0], kl_logp=0.2),  # A, step 0
        _transition(1, 0.0, False, 3, [0.2]),                     # B, step 0
        _transition(1, 2.0, True, None, [1.5], kl_logp=0.2),      # A, step 1 (terminal)
        _transition(2, 0.5, False, None, [0.1, 0.3]),             # B, step 1 (cut)
    ]
    stats = compute_advantages(transitions, {3: 3.0}, kl_coef=BETA, gamma=GAMMA, lam=LAM, decomposed=True,
                               kl_estimator="k1")
    _, adv_a, ret_a = episode_gae([2, 1], [1.0, 2.0], np.full(3, 0.2), np.array([0.5, 1.0, 1.5]), kl_coef=BETA,
                                  gamma=GAMMA, lam=LAM, decomposed=True, terminated=True)
    _, adv_b, _ = episode_gae([1, 2], [0.0, 0.5], np.zeros(3), np.array([0.2, 0.1, 0.3]), kl_coef=BETA,
                              gamma=GAMMA, lam=LAM, decomposed=True, terminated=False, bootstrap_value=3.0)
    np.testing.assert_allclose(np.concatenate([transitions[0].advantages,
                                               transitions[2].advantages]), adv_a, rtol=1e-6)
    np.testing.assert_allclose(transitions[2].returns, ret_a[2:], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([transitions[1].advantages,
                                               transitions[3].advantages]), adv_b, rtol=1e-6)
    # the cut chain's last token: δ = 0.5 + 0.9·3 - 0.3
    assert transitions[3].advantages[-1] == pytest.approx(0.5 + 0.9 * 3.0 - 0.3)
    assert stats["kl_estimate"] == pytest.approx(0.2 * 3 / 6)  # k1 = 0.2 on A's 3 tokens, 0 on B's 3
