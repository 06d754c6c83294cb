"""GRPO / RLOO math checked against values computed by hand (see the comments for each derivation)."""

import math

import numpy as np
import pytest
import torch

from agents.grpo import (
    action_credits,
    compute_group_advantages,
    form_groups,
    group_advantages,
    grpo_loss,
    grpo_update,
    k3_kl,
    returns_to_go,
    token_weights,
)
from agents.rollout import Transition

# One group of four rewards: mean 2, deviations [-2, -1, 0, 3], population variance (4+1+0+9)/4 = 3.5.
REWARDS = [0.0, 1.0, 2.0, 5.0]
STD = math.sqrt(3.5)  # 1.8708287


def test_grpo_advantages_by_hand_with_and_without_std_scaling():
    # scaled: [-2, -1, 0, 3] / 1.8708287 = [-1.0690450, -0.5345225, 0, 1.6035675]
    np.testing.assert_allclose(group_advantages(REWARDS, "grpo", scale_rewards=True, eps=0.0),
                               [-1.0690450, -0.5345225, 0.0, 1.6035675], rtol=1e-6)
    # ε enters the denominator: (R - mean) / (std + ε)
    np.testing.assert_allclose(group_advantages(REWARDS, "grpo", scale_rewards=True, eps=0.5),
                               np.array([-2.0, -1.0, 0.0, 3.0]) / (STD + 0.5), rtol=1e-12)
    # Dr. GRPO: R - mean only
    np.testing.assert_allclose(group_advantages(REWARDS, "grpo", scale_rewards=False), [-2.0, -1.0, 0.0, 3.0])


def test_rloo_advantages_by_hand():
    # R_i - mean of the other three (sum 8): [0 - 8/3, 1 - 7/3, 2 - 6/3, 5 - 3/3] = [-2.6667, -1.3333, 0, 4]
    np.testing.assert_allclose(group_advantages(REWARDS, "rloo"), [-8 / 3, -4 / 3, 0.0, 4.0], rtol=1e-12)
    # std scaling does not apply to RLOO
    np.testing.assert_allclose(group_advantages(REWARDS, "rloo", scale_rewards=False),
                               group_advantages(REWARDS, "rloo", scale_rewards=True))


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", [True, False])
def test_equal_rewards_and_a_group_of_one_give_zero_advantage(kind, scale):
    assert (group_advantages([0.7, 0.7, 0.7], kind, scale) == 0.0).all()
    assert (group_advantages([3.0], kind, scale) == 0.0).all()
    with pytest.raises(ValueError):
        group_advantages([], kind, scale)


def test_unknown_advantage_kind_is_refused():
    with pytest.raises(ValueError, match="advantage kind"):
        group_advantages(REWARDS, "ppo")


def test_returns_to_go_by_hand():
    # γ = 0.5, r = [1, 2, 4]: G2 = 4, G1 = 2 + 0.5·4 = 4, G0 = 1 + 0.5·4 = 3
    np.testing.assert_allclose(returns_to_go([1.0, 2.0, 4.0], 0.5), [3.0, 4.0, 4.0])


# A buffer as the collector fills it with 3 envs: round 1 steps envs 0-2 on the shared first prompt P; round 2 steps
# the two episodes that go on (feedback prompts of their own) and a fresh episode on another prompt Q; and an
# episode that began in an earlier rollout shows up with a feedback prompt F.
P, Q = [1, 2, 3], [4, 5]


def step(obs, reward, n_tokens=2, next_index=None, terminated=False):
    return Transition(obs_ids=np.asarray(obs, np.int32), action_ids=np.arange(n_tokens, dtype=np.int32),
                      logp=np.zeros(n_tokens, np.float32), ref_logp=np.zeros(n_tokens, np.float32), reward=reward,
                      terminated=terminated, truncated=False, episode_id=0, t=0, next_index=next_index)


def buffer():
    return [
        step(P, 1.0, next_index=3),            # 0: episode A, attempt 1
        step(P, 0.0, next_index=4),            # 1: episode B, attempt 1
        step(P, 0.5, terminated=True),         # 2: episode C, solved at once
        step([7, 1], 2.0, terminated=True),    # 3: episode A, attempt 2 (feedback prompt)
        step([8, 1], 1.0, n_tokens=3),         # 4: episode B, attempt 2, cut by the rollout end
        step(Q, 1.0, terminated=True),         # 5: episode D on another prompt
        step([9, 9], 0.0, terminated=True),    # 6: episode E, begun in an earlier rollout
    ]


def test_prompt_groups_are_identical_observations():
    transitions = buffer()
    assert form_groups(transitions, "prompt") == [[0, 1, 2], [3], [4], [5], [6]]
    stats = compute_group_advantages(transitions, group_by="prompt", kind="grpo", scale_rewards=False)
    # group P: rewards [1, 0, 0.5], mean 0.5 -> [0.5, -0.5, 0]; every other group has one member -> 0
    advantages = [t.advantages for t in transitions]
    np.testing.assert_allclose([a[0] for a in advantages], [0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert [len(a) for a in advantages] == [2, 2, 2, 2, 3, 2, 2]  # one value per token, all equal
    assert all((a == a[0]).all() for a in advantages)
    # 5 groups of 7 actions; 5 of 7 advantages are exactly 0 (C's by its reward being the mean, four groups of one)
    assert stats == pytest.approx({"groups": 5, "group_size_mean": 7 / 5, "zero_advantage_share": 5 / 7})


def test_episode_groups_follow_chains_by_first_prompt_and_position():
    transitions = buffer()
    # chains: A = [0, 3], B = [1, 4], C = [2], D = [5], E = [6]; keyed (first observation, position)
    assert form_groups(transitions, "episode") == [[0, 1, 2], [3, 4], [5], [6]]
    # γ = 0.5, returns from each step on: A0 = 1 + 0.5·2 = 2, A1 = 2; B0 = 0 + 0.5·1 = 0.5, B1 = 1 (cut: what was
    # collected); C0 = 0.5; D0 = 1; E0 = 0
    np.testing.assert_allclose(action_credits(transitions, "episode", gamma=0.5), [2.0, 0.5, 0.5, 2.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(action_credits(transitions, "prompt"), [1.0, 0.0, 0.5, 2.0, 1.0, 1.0, 0.0])

    stats = compute_group_advantages(transitions, group_by="episode", kind="grpo", scale_rewards=True, gamma=0.5,
                                     eps=0.0)
    # (P, 0): credits [2, 0.5, 0.5], mean 1, deviations [1, -0.5, -0.5], std √(1.5/3) = 0.7071068
    #         -> [1.4142136, -0.7071068, -0.7071068]
    # (P, 1): the second attempts of A and B share their episodes' group despite their own feedback prompts:
    #         credits [2, 1], mean 1.5, std 0.5 -> [1, -1]
    # D and E: groups of one -> 0
    got = [t.advantages[0] for t in transitions]
    np.testing.assert_allclose(got, [1.4142136, -0.7071068, -0.7071068, 1.0, -1.0, 0.0, 0.0], rtol=1e-6)
    assert stats == pytest.approx({"groups": 4, "group_size_mean": 7 / 4, "zero_advantage_share": 2 / 7})

    compute_group_advantages(transitions, group_by="episode", kind="rloo", scale_rewards=True, gamma=0.5)
    # rloo (P, 0): [2 - (0.5+0.5)/2, 0.5 - (2+0.5)/2, 0.5 - 1.25] = [1.5, -0.75, -0.75]; (P, 1): [2 - 1, 1 - 2]
    got = [t.advantages[0] for t in transitions]
    np.testing.assert_allclose(got, [1.5, -0.75, -0.75, 1.0, -1.0, 0.0, 0.0], rtol=1e-6)


def test_unknown_group_by_is_refused():
    with pytest.raises(ValueError, match="group_by"):
        form_groups(buffer(), "task")


# ---------------------------------------------------------------------------------------------------------------
# The loss on a tiny batch: action 1 has 2 tokens with A = 1, action 2 has 1 token with A = -2 (plus padding).
# Ratios r = π/π_old = [1.5, 1.0 | 0.5, pad]; ε = 0.2.
#   token (1,1): min(1.5·1, 1.2·1) = 1.2        -> ℓ = -1.2   (clipped: no gradient)
#   token (1,2): min(1·1, 1·1) = 1              -> ℓ = -1     (∂ℓ/∂log π = -r·A = -1)
#   token (2,1): min(0.5·-2, 0.8·-2) = -1.6     -> ℓ = 1.6    (clipped: no gradient)
# KL to ρ: log ρ - log π = [0, ln 2 | -ln 2]: k3 = [0, 2 - ln 2 - 1, 0.5 + ln 2 - 1] = [0, 0.3068528, 0.1931472]
# (summing to 0.5 exactly); ∂k3/∂log π = 1 - ρ/π = [0, -1, 0.5].
# ---------------------------------------------------------------------------------------------------------------
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
OLD = torch.log(torch.tensor([[0.2, 0.3], [0.4, 0.5]]))
RATIOS = torch.tensor([[1.5, 1.0], [0.5, 1.0]])
ADV = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
LOG_RHO_MINUS_PI = torch.tensor([[0.0, math.log(2)], [-math.log(2), 0.0]])


def tiny_batch():
    logp = (OLD + torch.log(RATIOS)).requires_grad_(True)
    return logp, (logp + LOG_RHO_MINUS_PI).detach()


@pytest.mark.parametrize("loss_norm, expected", [
    ("sequence", ((-1.2 - 1.0) / 2 + 1.6) / 2),   # mean per action, then over actions: (-1.1 + 1.6)/2 = 0.25
    ("token", (-1.2 - 1.0 + 1.6) / 3),             # mean over the 3 tokens: -0.2
    ("constant", (-1.2 - 1.0 + 1.6) / (2 * 4)),    # sum / (2 actions × max_new_tokens 4): -0.075
])
def test_loss_under_each_normalisation_by_hand(loss_norm, expected):
    logp, ref = tiny_batch()
    loss, stats = grpo_loss(logp, OLD, ref, ADV, MASK, clip=0.2, kl_coef=0.0, loss_norm=loss_norm, max_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)  # 1.5 and 0.5 left [0.8, 1.2]
    # approx KL(π_old‖π) = mean((r - 1) - log r) = ((0.5 - ln 1.5) + 0 + (-0.5 + ln 2))/3 = 0.0958940
    assert stats["approx_kl"].item() == pytest.approx(0.0958940, rel=1e-5)


def test_token_weights_by_hand():
    # sequence: 1/(B·n_i) = [[1/4, 1/4], [1/2, 0]]; token: 1/3 on valid tokens; constant: 1/(2·4)
    torch.testing.assert_close(token_weights(MASK, "sequence", 4), torch.tensor([[0.25, 0.25], [0.5, 0.0]]))
    torch.testing.assert_close(token_weights(MASK, "token", 4), MASK / 3)
    torch.testing.assert_close(token_weights(MASK, "constant", 4), MASK / 8)
    with pytest.raises(ValueError, match="loss_norm"):
        token_weights(MASK, "batch", 4)


def test_k3_value_and_gradient_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.5])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    k3 = k3_kl(logp, ref)
    # ρ/π = [1, 2, 0.5]: k3 = ρ/π - log(ρ/π) - 1 = [0, 1 - ln 2, -0.5 + ln 2] = [0, 0.3068528, 0.1931472]
    np.testing.assert_allclose(k3.detach().numpy(), [0.0, 0.3068528, 0.1931472], rtol=1e-6, atol=1e-7)
    k3.sum().backward()
    # ∂k3/∂log π = 1 - ρ/π = [0, -1, 0.5]
    np.testing.assert_allclose(logp.grad.numpy(), [0.0, -1.0, 0.5], atol=1e-6)


def test_kl_term_in_the_loss_value_and_gradient_by_hand():
    logp, ref = tiny_batch()
    loss, stats = grpo_loss(logp, OLD, ref, ADV, MASK, clip=0.2, kl_coef=0.1, loss_norm="token", max_tokens=4)
    # token mean: surrogate -0.2, k3 sum 0.5 over 3 tokens -> kl_loss = 1/6; loss = -0.2 + 0.1/6 = -0.1833333
    assert stats["kl_loss"].item() == pytest.approx(1 / 6, rel=1e-6)
    assert loss.item() == pytest.approx(-0.2 + 0.1 / 6, rel=1e-6)
    loss.backward()
    # ∂/∂log π per token, divided by 3 tokens: surrogate [0, -1 | 0] + 0.1·(1 - ρ/π) [0, -1 | 0.5]
    #   = [0, -1.1/3 | 0.05/3] = [0, -0.3666667 | 0.0166667]; padding 0
    np.testing.assert_allclose(logp.grad.numpy(), [[0.0, -1.1 / 3], [0.05 / 3, 0.0]], atol=1e-6)


def test_kl_coef_needs_reference_logprobs():
    logp, _ = tiny_batch()
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, OLD, None, ADV, MASK, clip=0.2, kl_coef=0.1, loss_norm="token", max_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
# The update on a tabular policy: one row of logits per observation (its first id), tokens scored independently.
# ---------------------------------------------------------------------------------------------------------------
VOCAB = 5


class Table(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)))

    def score(self, batch):
        rows = [torch.log_softmax(self.logits[int(t.obs_ids[0])], -1)[torch.as_tensor(t.action_ids).long()]
                for t in batch]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def adamw(table):
    return torch.optim.AdamW(table.parameters(), lr=0.1, weight_decay=0.0)  # torch's default decay is 0.01


def group_of(rewards, table):
    """One prompt (observation 0), four sampled actions of different lengths, rewards as given."""
    transitions = [step([0], r, n_tokens=1 + i % 2) for i, r in enumerate(rewards)]
    for i, t in enumerate(transitions):
        t.action_ids = np.array([i % VOCAB, (i + 1) % VOCAB][: len(t.action_ids)], np.int32)
    with torch.no_grad():
        old = table.score(transitions)
    for i, t in enumerate(transitions):
        t.old_logp = old[i, : len(t.action_ids)].numpy()
    return transitions


def run_update(rewards, kind="grpo"):
    table = Table()
    transitions = group_of(rewards, table)
    compute_group_advantages(transitions, group_by="prompt", kind=kind, scale_rewards=True)
    before = table.logits.detach().clone()
    stats = grpo_update(transitions, table.score, adamw(table), [table.logits],
                        iterations=2, minibatch_size=2, clip=0.2, kl_coef=0.0, loss_norm="sequence",
                        max_tokens=2, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    return before, table, transitions, stats


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_equal_rewards_leave_the_parameters_unchanged(kind):
    before, table, transitions, stats = run_update([1.0, 1.0, 1.0, 1.0], kind)
    assert all((t.advantages == 0).all() for t in transitions)
    assert stats["grad_norm"] == 0.0  # the policy gradient is exactly zero with kl_coef = 0 ...
    assert torch.equal(table.logits.detach(), before)  # ... so AdamW (no weight decay) does not move


def test_unequal_rewards_move_the_policy_towards_the_better_actions():
    before, table, transitions, stats = run_update([0.0, 1.0, 0.0, 0.0])
    assert stats["grad_norm"] > 0 and stats["gradient_steps"] == 4  # 2 iterations × 2 minibatches
    after = table.score(transitions).detach()
    with torch.no_grad():
        table.logits.copy_(before)
        start = table.score(transitions)
    # action 1 (tokens 1, 2; the only reward) got likelier, action 0 (token 0, negative advantage) less likely
    assert after[1, :2].sum() > start[1, :2].sum()
    assert after[0, 0] < start[0, 0]


def test_first_minibatch_ratio_is_one_when_old_logprobs_come_from_the_same_score():
    table = Table()
    transitions = group_of([0.0, 1.0, 2.0, 0.0], table)
    compute_group_advantages(transitions, group_by="prompt", kind="grpo", scale_rewards=True)
    stats = grpo_update(transitions, table.score, adamw(table), [table.logits],
                        iterations=1, minibatch_size=4, clip=0.2, kl_coef=0.0, loss_norm="token", max_tokens=2,
                        max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
    assert stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0
