"""ETPO math: hand-computed targets and losses, the KL chain rule, and convergence on toy MDPs to the soft optimum.

The toy problems drive the same `etpo_update` the LM learner uses; a tabular model (one-hot token-state features and
a table per role) stands in for the LM.
"""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.etpo import (
    Critic,
    UpdateSettings,
    compute_targets,
    critic_loss_per_token,
    etpo_losses,
    etpo_update,
    gathered_rows,
    make_optimizer,
    pack,
    policy_loss_per_state,
    sampled_correction_per_state,
    soft_bellman_targets,
    soft_lambda_returns,
    soft_optimal_policy,
    soft_value,
    state_values,
    token_kl,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def transition(obs, action, reward, terminated, next_index=None, next_obs_ids=None, truncated=False):
    return SimpleNamespace(obs_ids=np.asarray(obs, np.int32), action_ids=np.asarray(action, np.int32),
                           reward=float(reward), terminated=terminated, truncated=truncated,
                           next_index=next_index, next_obs_ids=next_obs_ids)


class TableCritic(Critic):
    """Q_φ as a table: the feature is the token state's row."""

    def __init__(self, table: torch.nn.Parameter):
        super().__init__()
        self.table = table

    def q_rows(self, hidden, summary=None):
        return self.table[hidden[..., 0].long()].float()


class TabularModels:
    """Token states are prefixes of the id sequence; each gets a one-hot feature, each role a table of V logits.

    π's logits are ρ's plus a trainable table (so training starts at π = ρ); the critic is a trainable table and its
    target an EMA copy. Padding positions map to a spare state that never carries a token state.
    """

    def __init__(self, vocab: int, capacity: int = 256, seed: int = 0, ref_scale: float = 1.0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.capacity = vocab, capacity
        self.index: dict[tuple, int] = {(): 0}
        self.ref = ref_scale * torch.randn(capacity, vocab, generator=gen)
        self.policy_delta = torch.nn.Parameter(torch.zeros(capacity, vocab))
        self.q = torch.nn.Parameter(torch.zeros(capacity, vocab))
        self.q_target = torch.zeros(capacity, vocab)
        self.vocab_size = vocab
        self.critic = TableCritic(self.q)

    def state(self, prefix) -> int:
        key = tuple(int(t) for t in prefix)
        if key not in self.index:
            assert len(self.index) < self.capacity, "tabular toy ran out of states"
            self.index[key] = len(self.index)
        return self.index[key]

    def hidden(self, role, input_ids, attention_mask):
        B, L = input_ids.shape
        idx = torch.zeros(B, L, dtype=torch.long)
        for b in range(B):
            n = int(attention_mask[b].sum())
            for p in range(n):
                idx[b, p] = self.state(input_ids[b, : p + 1].tolist())
        return idx[..., None].float()  # the "feature" is the state's row index (a one-hot in disguise)

    def rows(self, role, packed):
        return gathered_rows(lambda ids, mask: self.hidden(role, ids, mask), packed)

    def head(self, role, hidden, summary=None):
        rows = hidden[..., 0].long()
        if role == "policy":
            return self.ref[rows] + self.policy_delta[rows]
        return {"reference": self.ref, "critic": self.q, "target": self.q_target}[role][rows]

    def set_row(self, prefix, *, policy=None, reference=None, critic=None, target=None):
        """Write explicit rows (logits / Q values) for one token state."""
        s = self.state(prefix)
        with torch.no_grad():
            if reference is not None:
                self.ref[s] = torch.tensor(reference, dtype=torch.float32)
            if policy is not None:
                self.policy_delta[s] = torch.tensor(policy, dtype=torch.float32) - self.ref[s]
            if critic is not None:
                self.q[s] = torch.tensor(critic, dtype=torch.float32)
            if target is not None:
                self.q_target[s] = torch.tensor(target, dtype=torch.float32)

    def policy_parameters(self):
        return [self.policy_delta]

    def critic_parameters(self):
        return [self.q]

    def target_parameters(self):
        return [self.q_target]

    def probs(self, role, prefix) -> torch.Tensor:
        with torch.no_grad():
            h = torch.tensor([[float(self.state(prefix))]])
            return torch.softmax(self.head(role, h)[0], -1)




def logs(*p):
    return [math.log(x) for x in p]


# --------------------------------------------------------------------------------------------------------------
# Hand-computed 2-step, 3-token vocabulary example.
# Episode: step 0 has obs [10] and action [0, 1] (two tokens), reward 0.2; step 1 has obs [11] and action [0],
# reward 1.0, terminated. β = 0.5, γ = 0.9. Token states u0 = (10), u1 = (10, 0), u2 = (11).
#   u0: π = (1/2, 1/4, 1/4), ρ = (1/3, 1/3, 1/3), Q̄ = (1, 0, 2)
#   u1: π = (1/4, 1/2, 1/4), ρ = (1/2, 1/4, 1/4), Q̄ = (0, 1, 0)
#   u2: π = ρ = uniform,                           Q̄ = (3, 0, 0)
#   online critic Q_φ = 0.5 everywhere.
# By hand:
#   KL0 = ½·ln 1.5 + 2·¼·ln 0.75 = 0.0588915;  V0 = (½·1 + ¼·2) − ½·KL0 = 0.9705542
#   KL1 = ¼·ln ½ + ½·ln 2 = ¼·ln 2 = 0.1732868; V1 = ½·1 − ½·KL1 = 0.4133566
#   KL2 = 0;                                   V2 = ⅓·3 = 1
#   targets: y0 = V1 = 0.4133566; y1 = r0 + γ·V2 = 0.2 + 0.9 = 1.1; y2 = r1 = 1.0 (terminal)
#   critic (Huber δ=1 → ½e²): ½(0.5−0.4133566)² = 0.0037535, ½(0.6)² = 0.18, ½(0.5)² = 0.125 → mean 0.1029178
#   policy per state = β·KL − E_π Q_φ: 0.0294458 − 0.5, 0.0866434 − 0.5, −0.5 → mean −0.4613036
# --------------------------------------------------------------------------------------------------------------
BETA, GAMMA = 0.5, 0.9


def hand_example():
    m = TabularModels(vocab=3)
    m.set_row([10], policy=logs(1 / 2, 1 / 4, 1 / 4), reference=logs(1 / 3, 1 / 3, 1 / 3), target=[1, 0, 2],
              critic=[0.5] * 3)
    m.set_row([10, 0], policy=logs(1 / 4, 1 / 2, 1 / 4), reference=logs(1 / 2, 1 / 4, 1 / 4), target=[0, 1, 0],
              critic=[0.5] * 3)
    m.set_row([11], policy=logs(1 / 3, 1 / 3, 1 / 3), reference=logs(1 / 3, 1 / 3, 1 / 3), target=[3, 0, 0],
              critic=[0.5] * 3)
    buffer = [transition([10], [0, 1], 0.2, False, next_index=1), transition([11], [0], 1.0, True)]
    return m, buffer


def test_pure_functions_match_hand_computation():
    pi = torch.tensor([logs(1 / 2, 1 / 4, 1 / 4), logs(1 / 4, 1 / 2, 1 / 4), logs(1 / 3, 1 / 3, 1 / 3)])
    rho = torch.tensor([logs(1 / 3, 1 / 3, 1 / 3), logs(1 / 2, 1 / 4, 1 / 4), logs(1 / 3, 1 / 3, 1 / 3)])
    q_target = torch.tensor([[1.0, 0, 2], [0, 1, 0], [3, 0, 0]])
    assert token_kl(pi, rho).tolist() == pytest.approx([0.0588915, 0.1732868, 0.0], abs=1e-6)
    values = soft_value(pi, rho, q_target, BETA)
    assert values.tolist() == pytest.approx([0.9705542, 0.4133566, 1.0], abs=1e-6)
    targets = soft_bellman_targets([values[:2], values[2:]], [0.2, 1.0], [float(values[2]), 123.0], [False, True],
                                   GAMMA)
    assert torch.cat(targets).tolist() == pytest.approx([0.4133566, 1.1, 1.0], abs=1e-6)
    q_online = torch.full((3, 3), 0.5)
    crit = critic_loss_per_token(q_online[:, 0], torch.cat(targets), "huber", 1.0)
    assert crit.tolist() == pytest.approx([0.0037535, 0.18, 0.125], abs=1e-6)
    assert float(crit.mean()) == pytest.approx(0.1029178, abs=1e-6)
    pol = policy_loss_per_state(pi, rho, q_online, BETA)
    assert pol.tolist() == pytest.approx([-0.4705542, -0.4133566, -0.5], abs=1e-6)
    # MSE variant: same ½e² inside Huber's quadratic zone, larger outside it.
    assert critic_loss_per_token(torch.tensor([3.0]), torch.tensor([0.0]), "mse").item() == pytest.approx(4.5)
    assert critic_loss_per_token(torch.tensor([3.0]), torch.tensor([0.0]), "huber").item() == pytest.approx(2.5)


@pytest.mark.parametrize("chunk_size", [1, 2, 256])
def test_update_pipeline_matches_hand_computation(chunk_size):
    """Same numbers through the packing, target pass and chunked losses the LM learner runs."""
    m, buffer = hand_example()
    values, targets, missing = compute_targets(m, buffer, BETA, GAMMA, chunk_size, batch_size=1, pad_id=0,
                                               device="cpu")
    assert missing == 0
    assert torch.cat(values).tolist() == pytest.approx([0.9705542, 0.4133566, 1.0], abs=1e-6)
    assert torch.cat(targets).tolist() == pytest.approx([0.4133566, 1.1, 1.0], abs=1e-6)
    packed = pack([(t.obs_ids, t.action_ids) for t in buffer], pad_id=0, device="cpu")
    pol, crit, diag = etpo_losses(m, packed, torch.cat(targets), BETA, chunk_size)
    assert pol.item() == pytest.approx(-0.4613036, abs=1e-6)
    assert crit.item() == pytest.approx(0.1029178, abs=1e-6)
    assert diag["kl"].tolist() == pytest.approx([0.0588915, 0.1732868, 0.0], abs=1e-6)
    # the sampled correction: −(y − Q_φ)·log π(taken) per token = (−0.0600566, 0.4158883, 0.5493061), mean 0.3017126
    corrected, _, _ = etpo_losses(m, packed, torch.cat(targets), BETA, chunk_size, sampled_correction=1.0)
    assert corrected.item() == pytest.approx(-0.4613036 + 0.3017126, abs=1e-6)


def test_truncated_transition_bootstraps_from_next_observation():
    m, _ = hand_example()
    # Cut by a time limit after step 0: V(u¹_{t+1}) comes from next_obs_ids = [11] (V2 = 1), not from zero.
    buffer = [transition([10], [0, 1], 0.2, False, next_obs_ids=np.array([11], np.int32), truncated=True)]
    _, targets, missing = compute_targets(m, buffer, BETA, GAMMA, 4, 4, 0, "cpu")
    assert missing == 0 and targets[0].tolist() == pytest.approx([0.4133566, 1.1], abs=1e-6)
    # Terminated: no bootstrap at all.
    buffer = [transition([10], [0, 1], 0.2, True)]
    _, targets, _ = compute_targets(m, buffer, BETA, GAMMA, 4, 4, 0, "cpu")
    assert targets[0].tolist() == pytest.approx([0.4133566, 0.2], abs=1e-6)


def test_policy_gradient_depends_on_q_and_reference():
    """Guards against the reference implementation's uniform-mean policy step (gradient independent of Q, no ρ)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, requires_grad=True)
    rho, q = torch.randn(1, 5), torch.randn(1, 5)

    def grad(rho_, q_):
        logits.grad = None
        policy_loss_per_state(logits, rho_, q_, 0.3).sum().backward()
        return logits.grad.clone()

    base = grad(rho, q)
    assert not torch.allclose(base, grad(rho, q + torch.tensor([[1.0, 0, 0, 0, 0]])))
    assert not torch.allclose(base, grad(rho + torch.tensor([[0, 2.0, 0, 0, 0]]), q))


def test_policy_loss_minimiser_is_reference_tilted_by_q():
    torch.manual_seed(1)
    rho, q, beta = torch.randn(4, 6), torch.randn(4, 6), 0.7
    logits = torch.zeros(4, 6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(1000):
        opt.zero_grad()
        policy_loss_per_state(logits, rho, q, beta).sum().backward()
        opt.step()
    target = soft_optimal_policy(rho, q, beta)
    assert torch.softmax(logits, -1).detach() == pytest.approx(target, abs=1e-4)
    # At the optimum the loss equals −β·log Σ_w ρ·exp(Q/β) (the soft value identity).
    optimum = -beta * torch.logsumexp(torch.log_softmax(rho, -1) + q / beta, -1)
    assert policy_loss_per_state(logits, rho, q, beta).detach() == pytest.approx(optimum, abs=1e-5)


def _expected_policy_gradient(logits, rho, q_critic, q_true, beta, correction):
    """E_{w~π}[∇ (policy loss with Q_φ + correction·sampled correction with residual Q^π(w) − Q_φ(w))], enumerated."""
    pi = torch.softmax(logits.detach(), -1)[0]
    total = torch.zeros_like(logits)
    for w in range(logits.shape[-1]):
        logits.grad = None
        token = torch.tensor([w])
        loss = policy_loss_per_state(logits, rho, q_critic, beta).sum()
        loss = loss + correction * sampled_correction_per_state(logits, token, q_true[:, w] - q_critic[:, w]).sum()
        loss.backward()
        total += pi[w] * logits.grad
    return total


def test_sampled_correction_by_hand():
    """−(y − Q)·log π(w): 2 tokens with π = (0.25, 0.75), residual 2 at token 0 → 2·log 4; gradient −2·(1 − π₀, −π₁)."""
    logits = torch.log(torch.tensor([[0.25, 0.75]])).requires_grad_(True)
    loss = sampled_correction_per_state(logits, torch.tensor([0]), torch.tensor([2.0]))
    assert float(loss.detach()) == pytest.approx(2 * math.log(4), abs=1e-6)
    loss.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([-1.5, 1.5], abs=1e-6)


@pytest.mark.parametrize("old_p, residual, value, grad", [
    (0.25, 2.0, -2.0, [-1.5, 1.5]),  # r = 1: −δ·r, the gradient of the unclipped term (above)
    (0.2, 2.0, -2.4, [0.0, 0.0]),  # r = 1.25 > 1 + ε with δ > 0: clipped, no push further up
    (0.2, -2.0, 2.5, [1.875, -1.875]),  # r = 1.25 with δ < 0: unclipped, −δ·r·∇log π = 2·1.25·(0.75, −0.75)
    (0.5, -2.0, 1.6, [0.0, 0.0]),  # r = 0.5 < 1 − ε with δ < 0: clipped at 0.8, no push further down
])
def test_clipped_sampled_correction_by_hand(old_p, residual, value, grad):
    """PPO's surrogate with the critic's residual as advantage: π = (0.25, 0.75), token 0, ε = 0.2,
    −min(r·δ, clip(r, 0.8, 1.2)·δ) with r = 0.25 / π_old(0)."""
    logits = torch.log(torch.tensor([[0.25, 0.75]])).requires_grad_(True)
    loss = sampled_correction_per_state(logits, torch.tensor([0]), torch.tensor([residual]),
                                        old_logp=torch.log(torch.tensor([old_p])), clip=0.2)
    assert float(loss.detach()) == pytest.approx(value, abs=1e-6)
    loss.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx(grad, abs=1e-6)


def test_the_clipped_correction_keeps_the_policy_near_the_one_that_sampled():
    """One sampled token paid 1, a critic that stays at 0 (its learning rate is 0), 40 epochs of plain SGD in one
    update: unclipped, the correction pushes the token's probability far past π_old's; with ε = 0.2 it stops once
    the ratio leaves 1.2 (an SGD step can overshoot a little), and the update logs how far the policy moved."""
    ratios = {}
    for clip in (0.0, 0.2):
        m = TabularModels(vocab=3)
        m.set_row([5], policy=logs(1 / 3, 1 / 3, 1 / 3), reference=logs(1 / 3, 1 / 3, 1 / 3), critic=[0.0] * 3,
                  target=[0.0] * 3)
        settings = UpdateSettings(beta=0.05, gamma=GAMMA, sampled_correction=1.0, correction_clip=clip, epochs=40,
                                  minibatch_size=1, critic_loss="mse", max_grad_norm=0.0)
        stats = etpo_update(m, [transition([5], [1], 1.0, True)], settings,
                            torch.optim.SGD(m.policy_parameters(), lr=0.5), torch.optim.SGD(m.critic_parameters(), lr=0.0),
                            random.Random(0))
        ratios[clip] = float(m.probs("policy", [5])[1]) * 3
        assert ("clip_fraction" in stats) == (clip > 0)
    assert ratios[0.0] > 2.0, ratios
    assert 1.2 <= ratios[0.2] < 1.3, ratios


def test_sampled_correction_makes_the_policy_gradient_unbiased():
    """With a wrong critic Q_φ, the expected gradient of the policy loss plus the sampled correction (residual: the
    true Q^π minus Q_φ at the sampled token) equals the gradient of the policy loss under the true Q^π; without the
    correction it does not. With Q_φ = Q^π the correction adds nothing in expectation."""
    torch.manual_seed(2)
    logits = torch.randn(1, 5, requires_grad=True)
    rho, q_true, beta = torch.randn(1, 5), torch.randn(1, 5), 0.3
    q_critic = q_true + torch.randn(1, 5)
    logits.grad = None
    policy_loss_per_state(logits, rho, q_true, beta).sum().backward()
    exact = logits.grad.clone()
    corrected = _expected_policy_gradient(logits, rho, q_critic, q_true, beta, 1.0)
    assert corrected == pytest.approx(exact, abs=1e-5)
    assert not torch.allclose(_expected_policy_gradient(logits, rho, q_critic, q_true, beta, 0.0), exact, atol=1e-3)
    assert _expected_policy_gradient(logits, rho, q_true, q_true, beta, 1.0) == pytest.approx(exact, abs=1e-5)


def test_chain_rule_token_kls_sum_to_sequence_kl():
    """E_{a~π} Σ_j KL(π(·|uʲ)‖ρ(·|uʲ)) = KL(π(a)‖ρ(a)) over all 3-token actions of a 3-token vocabulary, exactly."""
    m = TabularModels(vocab=3, seed=3)
    gen = torch.Generator().manual_seed(4)
    obs = [7]
    actions = list(itertools.product(range(3), repeat=3))
    for a in actions:  # give π its own random conditionals at every prefix
        for j in range(3):
            prefix = obs + list(a[:j])
            m.set_row(prefix, policy=torch.randn(3, generator=gen).tolist())
    seq_kl, expected_token_kl = 0.0, 0.0
    for a in actions:
        prefixes = [obs + list(a[:j]) for j in range(3)]
        pi = [float(m.probs("policy", p)[w]) for p, w in zip(prefixes, a, strict=True)]
        rho = [float(m.probs("reference", p)[w]) for p, w in zip(prefixes, a, strict=True)]
        p_a = math.prod(pi)
        seq_kl += p_a * (math.log(p_a) - math.log(math.prod(rho)))
        # Per-token KLs along this action, through the chunked pipeline's own function on the LM-style path.
        packed = pack([(np.array(obs), np.array(a))], 0, "cpu")
        h = m.hidden("policy", packed.input_ids, packed.attention_mask)[packed.row_batch, packed.row_pos]
        kls = token_kl(m.head("policy", h), m.head("reference", h))
        expected_token_kl += p_a * float(kls.sum().detach())
    assert seq_kl > 0.05
    assert expected_token_kl == pytest.approx(seq_kl, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Toy MDPs: on-policy sampling, then `etpo_update` — the learner's own update — until convergence.
# --------------------------------------------------------------------------------------------------------------


def sample_action(m: TabularModels, obs, n_tokens, rng: np.random.Generator):
    action = []
    for _ in range(n_tokens):
        p = m.probs("policy", list(obs) + action).double().numpy()
        action.append(int(rng.choice(len(p), p=p / p.sum())))
    return action


def sequence_prob(m, role, obs, action):
    return math.prod(float(m.probs(role, list(obs) + list(action[:j]))[w]) for j, w in enumerate(action))


def train_toy(m, run_episode, iterations, episodes_per_iter, settings, lr, seed=0, anneal=False):
    """`iterations` updates on fresh episodes; `anneal` decays both learning rates linearly to 0 over the second
    half (stochastic approximation: Monte-Carlo targets are noisy, and a constant Adam step keeps Q jittering)."""
    rng, py_rng = np.random.default_rng(seed), random.Random(seed)
    pol_opt = make_optimizer(m.policy_parameters(), "adamw", lr, 0.0)
    crit_opt = make_optimizer(m.critic_parameters(), "adamw", lr, 0.0)
    for it in range(iterations):
        if anneal:
            for group in pol_opt.param_groups + crit_opt.param_groups:
                group["lr"] = lr * min(1.0, 2.0 * (1.0 - it / iterations))
        buffer = []
        for _ in range(episodes_per_iter):
            run_episode(m, rng, buffer)
        etpo_update(m, buffer, settings, pol_opt, crit_opt, py_rng)


@pytest.mark.parametrize("sampled_correction", [0.0, 1.0])
def test_bandit_converges_to_reference_tilted_by_reward(sampled_correction):
    """One env step, 2-token actions over 3 tokens (9 actions), reward table r: π(a) → ρ(a)·exp(r(a)/β)/Z, with or
    without the sampled correction (it changes the gradient's estimator, not the optimum).

    Tolerance: every action probability within 0.02 of the analytic optimum (total variation ≤ 0.05).
    """
    beta, n_tok = 0.5, 2
    m = TabularModels(vocab=3, seed=5)
    actions = list(itertools.product(range(3), repeat=n_tok))
    rewards = dict(zip(actions, np.random.default_rng(6).uniform(0, 1, len(actions)), strict=True))
    obs = [9]

    def episode(model, rng, buffer):
        a = sample_action(model, obs, n_tok, rng)
        buffer.append(transition(obs, a, rewards[tuple(a)], True))

    settings = UpdateSettings(beta=beta, gamma=0.9, sampled_correction=sampled_correction, epochs=1, minibatch_size=64,
                              chunk_size=64, critic_loss="mse", ema_rate=0.5, max_grad_norm=0.0)
    train_toy(m, episode, iterations=70, episodes_per_iter=32, settings=settings, lr=0.1)

    rho = np.array([sequence_prob(m, "reference", obs, a) for a in actions])
    optimum = rho * np.exp(np.array([rewards[a] for a in actions]) / beta)
    optimum /= optimum.sum()
    learned = np.array([sequence_prob(m, "policy", obs, a) for a in actions])
    assert np.abs(learned - rho).max() > 0.05, "toy too easy: the optimum is close to ρ"
    assert np.abs(learned - optimum).max() < 0.02, np.abs(learned - optimum).max()
    assert 0.5 * np.abs(learned - optimum).sum() < 0.05


def two_step_mdp_distance_to_the_soft_optimum(lam: float = 0.0, iterations: int = 220, episodes: int = 24,
                                              anneal: bool = False) -> tuple[float, float]:
    """Two env steps; step 0's first token picks which of 3 states step 1 starts in; γ = 0.8; ETPO at `lam`.

    DP (sequence level): V1(s) = β·log Σ_a ρ(a|s)·exp(r1(s,a)/β); Q0(a) = r0(a) + γ·V1(s(a));
    π*0(a) ∝ ρ(a)·exp(Q0(a)/β); π*1(a|s) ∝ ρ(a|s)·exp(r1(s,a)/β). Returns (the largest gap of any learned
    sequence probability to the optimum's, the largest gap of the step-0 optimum to ρ: how far from ρ it is).
    """
    beta, gamma, n_tok = 0.5, 0.8, 2
    m = TabularModels(vocab=3, seed=7, capacity=64)
    actions = list(itertools.product(range(3), repeat=n_tok))
    rng_r = np.random.default_rng(8)
    r0 = dict(zip(actions, rng_r.uniform(0, 0.5, len(actions)), strict=True))
    r1 = {s: dict(zip(actions, rng_r.uniform(0, 1, len(actions)), strict=True)) for s in range(3)}
    obs0 = [20]

    def obs1(a0):
        return [30 + a0[0]]

    def episode(model, rng, buffer):
        a0 = sample_action(model, obs0, n_tok, rng)
        a1 = sample_action(model, obs1(a0), n_tok, rng)
        i = len(buffer)
        buffer.append(transition(obs0, a0, r0[tuple(a0)], False, next_index=i + 1))
        buffer.append(transition(obs1(a0), a1, r1[a0[0]][tuple(a1)], True))

    settings = UpdateSettings(beta=beta, gamma=gamma, lam=lam, epochs=1, minibatch_size=128, chunk_size=128,
                              critic_loss="mse", ema_rate=0.5, max_grad_norm=0.0)
    train_toy(m, episode, iterations=iterations, episodes_per_iter=episodes, settings=settings, lr=0.1,
              anneal=anneal)

    worst = 0.0
    v1 = {}
    for s in range(3):
        rho = np.array([sequence_prob(m, "reference", [30 + s], a) for a in actions])
        tilt = rho * np.exp(np.array([r1[s][a] for a in actions]) / beta)
        v1[s] = beta * math.log(tilt.sum())
        learned = np.array([sequence_prob(m, "policy", [30 + s], a) for a in actions])
        worst = max(worst, np.abs(learned - tilt / tilt.sum()).max())
    rho0 = np.array([sequence_prob(m, "reference", obs0, a) for a in actions])
    q0 = np.array([r0[a] + gamma * v1[a[0]] for a in actions])
    opt0 = rho0 * np.exp(q0 / beta)
    opt0 /= opt0.sum()
    learned0 = np.array([sequence_prob(m, "policy", obs0, a) for a in actions])
    return max(worst, np.abs(learned0 - opt0).max()), np.abs(opt0 - rho0).max()


def test_two_step_mdp_converges_to_dynamic_programming_soft_optimum():
    """The paper's one-step targets (λ = 0): every probability within 0.03 of the DP soft optimum."""
    worst, optimum_to_rho = two_step_mdp_distance_to_the_soft_optimum()
    assert optimum_to_rho > 0.05, "toy too easy: the optimum is close to ρ"
    assert worst < 0.03, worst


# --------------------------------------------------------------------------------------------------------------
# The hand example with a two-token next action: step 1's action is [0, 2], adding u3 = (11, 0) with
#   u3: π = ρ = uniform, Q̄ = (0, 0, 1.5)  →  KL3 = 0, V3 = ½.
# The last token of step 0 bootstraps from the *first* token state of step 1 (u2), not its last (u3):
#   y0 = V1 = 0.4133566;  y1 = r0 + γ·V2 = 1.1 (from u3 it would be 0.2 + 0.9·½ = 0.65);  y2 = V3 = 0.5;  y3 = r1 = 1
#   critic ½e² with Q_φ = ½: 0.0037535, 0.18, 0, 0.125 → mean 0.0771884
#   policy per state: −0.4705542, −0.4133566, −0.5, −0.5 → mean −0.4709777
# --------------------------------------------------------------------------------------------------------------
def hand_example_two_token_next():
    m, _ = hand_example()
    m.set_row([11, 0], policy=logs(1 / 3, 1 / 3, 1 / 3), reference=logs(1 / 3, 1 / 3, 1 / 3), target=[0, 0, 1.5],
              critic=[0.5] * 3)
    buffer = [transition([10], [0, 1], 0.2, False, next_index=1), transition([11], [0, 2], 1.0, True)]
    return m, buffer


def test_bootstrap_reads_the_first_token_state_of_a_multi_token_next_action():
    m, buffer = hand_example_two_token_next()
    values, targets, missing = compute_targets(m, buffer, BETA, GAMMA, 256, batch_size=2, pad_id=0, device="cpu")
    assert missing == 0
    assert torch.cat(values).tolist() == pytest.approx([0.9705542, 0.4133566, 1.0, 0.5], abs=1e-6)
    assert torch.cat(targets).tolist() == pytest.approx([0.4133566, 1.1, 0.5, 1.0], abs=1e-6)
    packed = pack([(t.obs_ids, t.action_ids) for t in buffer], pad_id=0, device="cpu")
    pol, crit, _ = etpo_losses(m, packed, torch.cat(targets), BETA, 2)
    assert crit.item() == pytest.approx(0.0771884, abs=1e-6)
    assert pol.item() == pytest.approx(-0.4709777, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# One `etpo_update` step by hand, on a one-state tabular toy with plain SGD: the order (optimiser step, then EMA),
# the EMA rate and per-network gradient clipping.
# --------------------------------------------------------------------------------------------------------------
def one_state_toy():
    """State (5,), one-token terminal action [1] with reward 1; Q_φ = (0, ½, 2), Q̄ = (0.1, 0.1, 0.1), π = ρ."""
    m = TabularModels(vocab=3)
    m.set_row([5], policy=logs(1 / 2, 1 / 4, 1 / 4), reference=logs(1 / 2, 1 / 4, 1 / 4), critic=[0.0, 0.5, 2.0],
              target=[0.1, 0.1, 0.1])
    return m, [transition([5], [1], 1.0, True)]


def sgd_update(m, buffer, lr=0.5, **overrides):
    settings = UpdateSettings(**{**dict(beta=BETA, gamma=GAMMA, epochs=1, minibatch_size=8, critic_loss="mse",
                                        ema_rate=0.25, max_grad_norm=0.0), **overrides})
    pol_opt = torch.optim.SGD(m.policy_parameters(), lr=lr)
    crit_opt = torch.optim.SGD(m.critic_parameters(), lr=lr)
    return etpo_update(m, buffer, settings, pol_opt, crit_opt, random.Random(0))


def test_ema_target_follows_the_stepped_critic_at_rate_tau():
    """By hand (τ = 0.25, SGD lr ½, MSE): y = r = 1 (terminal); the taken Q is ½, its gradient ½ − 1 = −½, so the
    step gives Q_φ(u, 1) = ½ + ½·½ = 0.75; then Q̄ ← (1 − τ)·Q̄ + τ·Q_φ: 0.75·0.1 + 0.25·(0, 0.75, 2) =
    (0.075, 0.2625, 0.575). (EMA before the step: 0.2 at the taken token; rate 1 − τ: 0.5875; τ = 1: 0.75.)"""
    m, buffer = one_state_toy()
    sgd_update(m, buffer)
    s = m.state([5])
    assert m.q[s].tolist() == pytest.approx([0.0, 0.75, 2.0], abs=1e-6)
    assert m.q_target[s].tolist() == pytest.approx([0.075, 0.2625, 0.575], abs=1e-6)
    # a state the batch never visits still moves towards the (unchanged) online critic at rate τ
    other = m.state([7])
    assert m.q_target[other].tolist() == pytest.approx((0.75 * 0.0 + 0.25 * m.q[other]).tolist(), abs=1e-6)


def test_ema_target_moves_after_every_optimiser_step_not_once_per_epoch():
    """Two minibatches of one transition (order [0, 1]): action 1 (y = 1), then action 2 (y = 0). SGD lr ½ on
    ½(Q − y)²: Q₁ = (0, 0.75, 2), Q₂ = (0, 0.75, 1); the EMA after each step: Q̄₁ = 0.75·0.1 + 0.25·Q₁ =
    (0.075, 0.2625, 0.575), Q̄₂ = 0.75·Q̄₁ + 0.25·Q₂ = (0.05625, 0.384375, 0.68125). (Once per epoch:
    0.75·0.1 + 0.25·Q₂ = (0.075, 0.2625, 0.325).)"""
    m, buffer = one_state_toy()
    buffer.append(transition([5], [2], 0.0, True))
    sgd_update(m, buffer, minibatch_size=1)
    s = m.state([5])
    assert m.q[s].tolist() == pytest.approx([0.0, 0.75, 1.0], abs=1e-6)
    assert m.q_target[s].tolist() == pytest.approx([0.05625, 0.384375, 0.68125], abs=1e-6)


def test_the_learner_config_hands_every_update_setting_to_the_update():
    from dataclasses import fields

    from agents.etpo import ETPOConfig

    chosen = dict(beta=0.3, gamma=0.7, lam=0.6, sampled_correction=0.5, correction_clip=0.1, target_refresh="update", correction_residual="update", epochs=3, minibatch_size=5, inference_batch_size=6, chunk_size=11,
                  critic_loss="mse", huber_delta=2.5, ema_rate=0.2, max_grad_norm=0.4)
    settings = ETPOConfig(**chosen).update_settings(pad_id=9)
    assert {f.name for f in fields(UpdateSettings)} == set(chosen) | {"pad_id"}  # nothing left at its default
    assert {name: getattr(settings, name) for name in chosen} == chosen and settings.pad_id == 9


def test_gradients_are_clipped_per_network():
    """Both raw gradient norms exceed the clip c; each network's step is then exactly lr·c long (clipping the two
    networks jointly would shorten both steps, by c/‖(g_π, g_Q)‖)."""
    clip, lr = 1e-3, 1.0
    m, buffer = one_state_toy()
    before_pi, before_q = m.policy_delta.detach().clone(), m.q.detach().clone()
    stats = sgd_update(m, buffer, lr=lr, max_grad_norm=clip)
    assert stats["grad_norm/policy"] > 10 * clip and stats["grad_norm/critic"] > 10 * clip
    assert float((m.policy_delta.detach() - before_pi).norm()) == pytest.approx(lr * clip, rel=1e-4)
    assert float((m.q.detach() - before_q).norm()) == pytest.approx(lr * clip, rel=1e-4)


def test_targets_are_recomputed_every_epoch():
    """Two epochs on one minibatch equal two one-epoch updates: the second epoch's targets come from the policy and
    target critic after the first epoch's step, not from those the update started with."""
    twice, buffer = hand_example()
    epochs2, _ = hand_example()
    first = sgd_update(twice, buffer)
    second = sgd_update(twice, buffer)
    assert first["targets/mean"] != pytest.approx(second["targets/mean"], abs=1e-4)  # the targets did move
    sgd_update(epochs2, buffer, epochs=2)
    for name in ("policy_delta", "q", "q_target"):
        torch.testing.assert_close(getattr(epochs2, name).detach(), getattr(twice, name).detach(), rtol=0,
                                   atol=1e-6, msg=name)


def test_targets_once_per_update_serve_every_epoch():
    """target_refresh="update": one target pass before the first epoch, whose targets every later epoch regresses on
    (the target critic is evaluated once per transition, not once per epoch), so two epochs differ from two one-epoch
    updates; with one epoch both schedules are the same update, bit for bit."""
    once, buffer = hand_example()
    calls = []
    hidden = once.hidden
    once.hidden = lambda role, ids, mask: calls.append(role) or hidden(role, ids, mask)
    stats = sgd_update(once, buffer, epochs=2, target_refresh="update", inference_batch_size=1)
    assert calls.count("target") == len(buffer)
    twice, _ = hand_example()
    sgd_update(twice, buffer)
    sgd_update(twice, buffer)
    assert not torch.allclose(once.q.detach(), twice.q.detach(), atol=1e-6)
    assert stats["targets/mean"] == pytest.approx(sgd_update(hand_example()[0], buffer)["targets/mean"], abs=1e-7)
    per_epoch, _ = hand_example()
    per_update, _ = hand_example()
    sgd_update(per_epoch, buffer, target_refresh="epoch")
    sgd_update(per_update, buffer, target_refresh="update")
    for name in ("policy_delta", "q", "q_target"):
        torch.testing.assert_close(getattr(per_update, name).detach(), getattr(per_epoch, name).detach(), rtol=0,
                                   atol=0, msg=name)


def test_correction_residuals_fixed_for_the_update_read_the_critic_before_its_first_step():
    """correction_residual="update", by hand on the one-state toy (y = r = 1, Q_φ(u, 1) = ½, SGD lr ½, MSE, no clip):
    the first step is the same as "step" (δ₀ = 1 − ½); the critic then steps to Q₁(u, 1) = ¾, so "step"'s second
    correction reads δ₁ = ¼ while "update" still reads δ₀ = ½. The correction −δ·log π(w) moves the logits by
    lr·δ·(e_w − π), so after two epochs the two policies differ by exactly lr·(δ₀ − δ₁)·(e_w − π₁), π₁ the policy
    after the (shared) first step; the critics are the same."""
    lr, common = 0.5, dict(sampled_correction=1.0, correction_clip=0.0, minibatch_size=1)
    runs = {}
    for residual, epochs in (("step", 1), ("update", 1), ("step", 2), ("update", 2)):
        m, buffer = one_state_toy()
        sgd_update(m, buffer, lr=lr, epochs=epochs, correction_residual=residual, **common)
        runs[residual, epochs] = m
    s = runs["step", 1].state([5])
    for name in ("policy_delta", "q", "q_target"):
        torch.testing.assert_close(getattr(runs["update", 1], name).detach(), getattr(runs["step", 1], name).detach(),
                                   rtol=0, atol=0, msg=name)
        if name != "policy_delta":
            torch.testing.assert_close(getattr(runs["update", 2], name).detach(),
                                       getattr(runs["step", 2], name).detach(), rtol=0, atol=0, msg=name)
    assert runs["step", 1].q[s, 1].item() == pytest.approx(0.75)
    pi_1 = torch.softmax(runs["step", 1].ref[s] + runs["step", 1].policy_delta[s].detach(), -1)
    expected = lr * (0.5 - 0.25) * (torch.tensor([0.0, 1.0, 0.0]) - pi_1)
    difference = runs["update", 2].policy_delta[s].detach() - runs["step", 2].policy_delta[s].detach()
    torch.testing.assert_close(difference, expected, rtol=0, atol=1e-6)


def test_reference_features_are_computed_once_per_update():
    """ρ is fixed during an update: one reference pass over the buffer serves every epoch's targets and policy
    steps (before: epochs × (target pass + every minibatch)). The hand-computed and convergence tests above pin
    that the update's numbers are unchanged."""
    m, buffer = hand_example()
    calls = []
    hidden = m.hidden
    m.hidden = lambda role, ids, mask: calls.append(role) or hidden(role, ids, mask)
    sgd_update(m, buffer, epochs=3, minibatch_size=1, inference_batch_size=1)
    assert calls.count("reference") == len(buffer)  # one pass, one transition at a time
    assert calls.count("target") == 3 * len(buffer)  # the target critic is still evaluated anew every epoch


def test_no_gradient_passes_take_inference_batches_and_give_the_same_update():
    """ρ's features and the target pass run `inference_batch_size` transitions per call (no graph is kept, so more
    than a minibatch fits), the optimiser steps `minibatch_size`; the numbers do not depend on the former."""
    batched, buffer = hand_example()
    calls = []
    hidden = batched.hidden
    batched.hidden = lambda role, ids, mask: calls.append((role, len(ids))) or hidden(role, ids, mask)
    sgd_update(batched, buffer, epochs=2, minibatch_size=1, inference_batch_size=len(buffer))
    assert [n for role, n in calls if role == "reference"] == [len(buffer)]
    assert [n for role, n in calls if role == "target"] == [len(buffer)] * 2  # once per epoch, all at once
    assert [n for role, n in calls if role == "critic"] == [1] * 2 * len(buffer)  # the steps: one at a time
    alone, _ = hand_example()
    sgd_update(alone, buffer, epochs=2, minibatch_size=1, inference_batch_size=1)
    for name in ("policy_delta", "q", "q_target"):
        torch.testing.assert_close(getattr(batched, name).detach(), getattr(alone, name).detach(), rtol=0,
                                   atol=1e-6, msg=name)


def test_head_graphs_are_kept_for_a_small_vocabulary_and_recomputed_for_a_large_one(monkeypatch):
    """Under a graph, a chunk's [rows, V] head runs under activation checkpointing only when all rows × V would
    exceed KEPT_HEAD_ELEMENTS (or V is unknown); the gradients are the same either way."""
    import agents.etpo.update as etpo

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(30, 8, requires_grad=True)
    fn = lambda h: torch.logsumexp(head(h), -1).sum()  # noqa: E731
    recomputed = []
    real = etpo.checkpoint
    monkeypatch.setattr(etpo, "checkpoint", lambda f, *a, **k: recomputed.append(f) or real(f, *a, **k))
    seen = {}
    for budget in (30 * 50 - 1, 30 * 50):
        monkeypatch.setattr(etpo, "KEPT_HEAD_ELEMENTS", budget)
        recomputed.clear()
        head.zero_grad()
        hidden.grad = None
        sum(etpo._over_chunks(fn, 8, hidden, vocab_size=50)).backward()
        seen[budget] = (len(recomputed), hidden.grad.clone(), head.weight.grad.clone())
    assert seen[30 * 50 - 1][0] == 4 and seen[30 * 50][0] == 0  # four chunks of ≤ 8 rows
    for a, b in zip(seen[30 * 50 - 1][1:], seen[30 * 50][1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    recomputed.clear()
    etpo._over_chunks(fn, 8, hidden)  # the vocabulary is not known: checkpointed
    assert len(recomputed) == 4
    with torch.no_grad():
        recomputed.clear()
        etpo._over_chunks(fn, 8, hidden, vocab_size=10**9)  # no graph: nothing to recompute
        assert not recomputed


# --------------------------------------------------------------------------------------------------------------
# Soft λ-returns (ETPOConfig.lam). The hand example: token states u0, u1 (step 0, reward 0.2), u2 (step 1, reward 1,
# terminal); V = (0.9705542, 0.4133566, 1), KL = (0.0588915, 0.1732868, 0), β = ½, γ = 0.9.
#   λ = 1 (Monte Carlo): G2 = 1;  G1 = 0.2 + 0.9·(G2 − β·KL2) = 1.1;  G0 = G1 − β·KL1 = 1.1 − 0.0866434 = 1.0133566
#   λ = ½: G2 = 1;  G1 = 0.2 + 0.9·(½·V2 + ½·(G2 − 0)) = 1.1;  G0 = ½·V1 + ½·(G1 − β·KL1) = 0.2066783 + 0.5066783
#          = 0.7133566
# --------------------------------------------------------------------------------------------------------------
def old_one_step_targets(state_values, rewards, next_values, dones, gamma):
    """The targets of main before λ existed (yʲ = V(uʲ⁺¹), yⁿ = r + γ·(1 − done)·V(u¹_{t+1})), kept verbatim."""
    targets = []
    for values, reward, next_value, done in zip(state_values, rewards, next_values, dones, strict=True):
        last = torch.tensor([reward + gamma * (0.0 if done else float(next_value))], dtype=torch.float32)
        targets.append(torch.cat([values[1:].float().cpu(), last]))
    return targets


@pytest.mark.parametrize("lam, expected", [(1.0, [1.0133566, 1.1, 1.0]), (0.5, [0.7133566, 1.1, 1.0])])
def test_lambda_returns_match_hand_computation(lam, expected):
    m, buffer = hand_example()
    _, targets, missing = compute_targets(m, buffer, BETA, GAMMA, 256, batch_size=1, pad_id=0, device="cpu",
                                          lam=lam)
    assert missing == 0
    assert torch.cat(targets).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("truncated", [False, True])
def test_lambda_one_target_pass_skips_the_target_critic_on_the_path_and_gives_the_same_targets(truncated):
    """At λ = 1 the path's V(uʲ) have weight 0: the target critic runs only for a bootstrap (a chain cut by a time
    limit), never over the buffer's token states, and the targets equal those of the full pass (`state_values`' V and
    KL of every state into the same λ-returns) bit for bit."""
    m, buffer = hand_example_two_token_next()
    if truncated:  # the chain now ends in a time-limit cut after step 1: V(u¹) of next_obs_ids [10] bootstraps it
        buffer[1] = transition([11], [0, 2], 1.0, False, next_obs_ids=np.array([10], np.int32), truncated=True)
    calls = []
    hidden = m.hidden
    m.hidden = lambda role, ids, mask: calls.append((role, ids.shape[1])) or hidden(role, ids, mask)
    values, targets, missing = compute_targets(m, buffer, BETA, GAMMA, 256, batch_size=2, pad_id=0, device="cpu",
                                               lam=1.0)
    assert values is None and missing == 0
    assert [width for role, width in calls if role == "target"] == ([1] if truncated else [])  # the bootstrap only
    packed = pack([(t.obs_ids, t.action_ids) for t in buffer], pad_id=0, device="cpu")
    all_values, all_kls = state_values(m, packed, BETA, 256)
    bootstrap = float(state_values(m, pack([([10], [])], 0, "cpu"), BETA, 256)[0][0]) if truncated else 0.0
    expected = soft_bellman_targets(list(torch.split(all_values, packed.lengths)), [0.2, 1.0],
                                    [float(all_values[2]), bootstrap], [False, not truncated], GAMMA, lam=1.0,
                                    beta=BETA, state_kls=list(torch.split(all_kls, packed.lengths)), next_index=[1, None])
    assert torch.equal(torch.cat(targets), torch.cat(expected))


def test_lambda_one_is_the_monte_carlo_soft_return_of_a_chain():
    """Five token states in two actions (3 + 2 tokens), rewards 0.5 then 2 (terminal), γ = 0.8, β = 0.1:
    Gʲ = Σ of later rewards, discounted once per action boundary, minus β·KL of every later state on the path."""
    values = np.array([9.0, -4.0, 7.0, 3.0, -1.0])  # λ = 1 never reads them
    kls = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    rewards, discounts = np.array([0, 0, 0.5, 0, 2.0]), np.array([1, 1, 0.8, 1, 0.0])
    got = soft_lambda_returns(values, kls, rewards, discounts, beta=0.1, lam=1.0)
    g4 = 2.0
    g3 = g4 - 0.1 * 0.5
    g2 = 0.5 + 0.8 * (g3 - 0.1 * 0.4)
    g1 = g2 - 0.1 * 0.3
    g0 = g1 - 0.1 * 0.2
    assert got.tolist() == pytest.approx([g0, g1, g2, g3, g4], abs=1e-12)
    # a chain cut before its end bootstraps from V after the last token, whatever λ
    cut = soft_lambda_returns(values, kls, rewards, np.array([1, 1, 0.8, 1, 0.8]), beta=0.1, lam=1.0,
                              bootstrap_value=5.0)
    assert cut[-1] == pytest.approx(2.0 + 0.8 * 5.0)


@pytest.mark.parametrize("seed", range(5))
def test_lambda_zero_reproduces_the_one_step_targets_bit_for_bit(seed):
    """Random buffers of chained, truncated and terminal transitions: λ = 0 gives exactly today's targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=6)
    values = [torch.from_numpy(rng.normal(size=n).astype(np.float32)) for n in lengths]
    kls = [torch.from_numpy(rng.uniform(0, 1, size=n).astype(np.float32)) for n in lengths]
    rewards = rng.normal(size=6).tolist()
    next_index = [1, 2, None, 4, None, None]  # chains 0→1→2 (2 terminal), 3→4 (4 truncated), 5 terminal
    dones = [False, False, True, False, False, True]
    next_values = [float(values[1][0]), float(values[2][0]), 0.0, float(values[4][0]), float(rng.normal()), 0.0]
    new = soft_bellman_targets(values, rewards, next_values, dones, GAMMA, lam=0.0, beta=0.3, state_kls=kls,
                               next_index=next_index)
    old = old_one_step_targets(values, rewards, next_values, dones, GAMMA)
    for a, b in zip(new, old, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def reward_at_the_end_of_a_long_chain(n_tokens=200):
    """One 200-token action (token 0 every time) with reward 1 at its end; π = ρ; Q_φ = Q̄ = 0 everywhere."""
    m = TabularModels(vocab=2, capacity=n_tokens + 4)
    return m, [transition([5], [0] * n_tokens, 1.0, True)]


@pytest.mark.parametrize("lam, first_moves", [(1.0, True), (0.0, False)])
def test_the_first_tokens_q_moves_within_one_update_only_with_lambda_one(lam, first_moves):
    m, buffer = reward_at_the_end_of_a_long_chain()
    sgd_update(m, buffer, lr=0.5, lam=lam)
    first, last = m.q[m.state([5]), 0].item(), m.q[m.state([5] + [0] * 199), 0].item()
    # SGD on the mean loss over 200 tokens: a token whose target is 1 moves by lr·1/200
    assert last == pytest.approx(0.5 / 200)  # the last token regresses on the reward either way
    if first_moves:
        assert first == pytest.approx(last)  # λ = 1: the first token's target is the reward too
    else:
        assert first == 0.0  # λ = 0: the reward has moved one token, not two hundred


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_every_lambda_converges_to_the_same_soft_optimum(lam):
    """The two-step toy at every λ ends within 0.03 of the same DP soft optimum (on-policy the fixed point does not
    depend on λ). Monte-Carlo targets are noisier: more episodes, and both learning rates annealed."""
    worst, _ = two_step_mdp_distance_to_the_soft_optimum(lam, iterations=300, episodes=32, anneal=True)
    assert worst < 0.03, worst
