"""PPO's update code on an enumerable toy problem: two-token actions over a 3-token vocabulary, known rewards.

A tabular model (logits per prefix, a value per prefix) stands in for the LM and drives the same functions the LM
learner uses: `compute_advantages` and `ppo_update`. With the KL penalty, the objective E[R] - β·KL(π‖ρ) has the
closed-form optimum π*(a) = ρ(a)·exp(R(a)/β)/Z over whole actions, so we can say exactly where PPO should land.
"""

import itertools

import numpy as np
import pytest
import torch

from agents.ppo import ForwardOutput, PPOUpdateSettings, compute_advantages, ppo_update
from agents.rollout import Transition

VOCAB = 3
# Reward of each two-token action (first token, second token); the best is (1, 2).
REWARD = np.array([[0.0, 0.2, 0.0],
                   [0.1, 0.0, 1.0],
                   [0.0, 0.3, 0.1]])
ACTIONS = list(itertools.product(range(VOCAB), repeat=2))

pytestmark = pytest.mark.usefixtures("single_torch_thread")




class TabularModel(torch.nn.Module):
    """π(w1)·π(w2|w1) from logit tables, V per prefix; the reference ρ is uniform."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Parameter(torch.zeros(VOCAB))
        self.second = torch.nn.Parameter(torch.zeros(VOCAB, VOCAB))
        self.v_root = torch.nn.Parameter(torch.zeros(()))
        self.v_prefix = torch.nn.Parameter(torch.zeros(VOCAB))

    def token_logits(self, first_tokens: torch.Tensor) -> torch.Tensor:
        """[B] first tokens -> [B, 2, V] logits for the two token states."""
        root = self.first.expand(len(first_tokens), VOCAB)
        return torch.stack([root, self.second[first_tokens]], dim=1)

    def forward(self, transitions) -> ForwardOutput:
        actions = torch.tensor(np.stack([t.action_ids for t in transitions]), dtype=torch.long)
        log_probs = torch.log_softmax(self.token_logits(actions[:, 0]), dim=-1)
        logp = log_probs.gather(-1, actions[..., None]).squeeze(-1)
        values = torch.stack([self.v_root.expand(len(actions)), self.v_prefix[actions[:, 0]]], dim=1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return ForwardOutput(logp=logp, values=values, entropy=entropy)

    @torch.no_grad()
    def action_probs(self) -> np.ndarray:
        first = torch.softmax(self.first, -1)
        second = torch.softmax(self.second, -1)
        return (first[:, None] * second).numpy().ravel()  # in ACTIONS order

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator) -> list[Transition]:
        first = torch.multinomial(torch.softmax(self.first, -1), n, replacement=True, generator=rng)
        second = torch.multinomial(torch.softmax(self.second[first], -1), 1, generator=rng).squeeze(-1)
        actions = torch.stack([first, second], dim=1).numpy().astype(np.int32)
        out = self.forward([_bare(a) for a in actions])
        return [Transition(obs_ids=np.zeros(1, np.int32), action_ids=a, logp=lp.numpy().astype(np.float32),
                           ref_logp=np.full(2, -np.log(VOCAB), np.float32), reward=float(REWARD[a[0], a[1]]),
                           terminated=True, truncated=False, episode_id=i, t=0, next_index=None,
                           old_logp=lp.numpy().astype(np.float32), values=v.numpy().astype(np.float32))
                for i, (a, lp, v) in enumerate(zip(actions, out.logp, out.values, strict=True))]


class _bare:
    def __init__(self, action_ids):
        self.action_ids = action_ids


def train(beta: float, decomposed: bool, iterations: int, seed: int = 0, batch: int = 128,
          gamma: float = 1.0) -> TabularModel:
    torch.manual_seed(seed)
    model = TabularModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    # Decay the step size so the last iterate settles instead of jittering around the optimum.
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.05, total_iters=iterations)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        transitions = model.sample(batch, rng)
        compute_advantages(transitions, {}, kl_coef=beta, gamma=gamma, lam=0.95, decomposed=decomposed,
                           kl_estimator="k1")
        stats = ppo_update(transitions, model, optimizer, list(model.parameters()),
                           PPOUpdateSettings(epochs=4, minibatch_size=64, value_clip=None, target_kl=None), rng)
        assert np.isfinite(stats["policy_loss"]) and stats["gradient_steps"] == 4 * batch // 64
        schedule.step()
    return model


def expected_reward(probs: np.ndarray) -> float:
    return float(probs @ REWARD.ravel())


@pytest.mark.parametrize("decomposed", [False, True])
def test_ppo_finds_the_best_action_with_a_small_kl_penalty(decomposed):
    model = train(beta=0.01, decomposed=decomposed, iterations=30)
    probs = model.action_probs()
    start = expected_reward(np.full(len(ACTIONS), 1 / len(ACTIONS)))
    assert start == pytest.approx(REWARD.mean())
    assert probs[ACTIONS.index((1, 2))] > 0.9, probs.round(3)
    assert expected_reward(probs) > 0.9 > start + 0.5


def test_ppo_converges_to_the_kl_regularised_optimum():
    # With β = 0.25 the optimum of E[R] - β·KL(π‖ρ) is π* ∝ ρ·exp(R/β) over whole actions (ρ uniform here).
    beta = 0.25
    model = train(beta=beta, decomposed=True, iterations=50)
    target = np.exp(REWARD.ravel() / beta)
    target /= target.sum()
    np.testing.assert_allclose(soft_optimum(beta, 1.0), target)  # the backward recursion agrees with π*
    probs = model.action_probs()
    total_variation = 0.5 * np.abs(probs - target).sum()
    assert total_variation < 0.02, (probs.round(3), target.round(3))


def soft_optimum(beta: float, first_token_discount: float) -> np.ndarray:
    """Optimal π over ACTIONS of the token-level objective E[-β·kl₁ + d·(R - β·kl₂)] (ρ uniform).

    Backward: π(w₂|w₁) ∝ exp(R/β) with soft value V(w₁) = β·log E_ρ[exp(R/β)]; then π(w₁) ∝ exp(d·V(w₁)/β).
    d = 1 is the sequence-level optimum π* ∝ ρ·exp(R/β); d = γ is where a naive per-token discount leads.
    """
    second = np.exp(REWARD / beta)
    soft_value = beta * np.log(second.mean(axis=1))
    first = np.exp(first_token_discount * soft_value / beta)
    return ((first / first.sum())[:, None] * second / second.sum(axis=1, keepdims=True)).ravel()


def test_decomposed_backup_keeps_the_sequence_level_optimum_when_discounting():
    # γ = 0.5 discounts between actions only in the decomposed backup, so within one action it changes nothing;
    # the naive backup discounts the second token's value seen from the first token, and lands elsewhere.
    beta, gamma = 0.25, 0.5
    target, naive_target = soft_optimum(beta, 1.0), soft_optimum(beta, gamma)
    assert 0.5 * np.abs(target - naive_target).sum() > 0.15  # the two fixed points are far apart
    decomposed = train(beta=beta, decomposed=True, iterations=50, gamma=gamma).action_probs()
    naive = train(beta=beta, decomposed=False, iterations=50, gamma=gamma).action_probs()
    assert 0.5 * np.abs(decomposed - target).sum() < 0.02, (decomposed.round(3), target.round(3))
    assert 0.5 * np.abs(naive - naive_target).sum() < 0.02, (naive.round(3), naive_target.round(3))


def _one_update(model, optimizer, **overrides):
    rng = torch.Generator().manual_seed(0)
    transitions = model.sample(128, rng)
    compute_advantages(transitions, {}, kl_coef=0.0, gamma=1.0, lam=1.0, decomposed=True, kl_estimator="k1")
    settings = dict(epochs=4, minibatch_size=32, value_clip=None, max_grad_norm=100.0, target_kl=None)
    return ppo_update(transitions, model, optimizer, list(model.parameters()),
                      PPOUpdateSettings(**{**settings, **overrides}), rng)


def test_approx_kl_early_stop_ends_the_epochs_before_a_step_from_a_far_policy():
    full = _one_update(TabularModel(), torch.optim.SGD(TabularModel().parameters(), lr=0.0))
    assert full["gradient_steps"] == 16 and full["stopped_early"] == 0
    model = TabularModel()
    stopped = _one_update(model, torch.optim.SGD(model.parameters(), lr=5.0), target_kl=1e-4)
    # The first minibatch sees π_θ = π_old (KL 0) and steps; the big step makes the next one exceed 1.5·target.
    assert stopped["stopped_early"] == 1 and stopped["gradient_steps"] == 1 and stopped["epochs_run"] == 1


def test_gradient_clipping_bounds_each_step():
    model = TabularModel()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = _one_update(model, torch.optim.SGD(model.parameters(), lr=1.0), epochs=1, minibatch_size=128,
                        max_grad_norm=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert stats["grad_norm"] > 1e-2  # the raw gradient was far larger than the clip...
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(1e-3, rel=1e-3)  # ...the step was not


def print_figures(seeds: int = 3) -> None:
    """`python -m tests.test_ppo_toy`: distance to each fixed point after 50 iterations, mean over seeds."""
    torch.set_num_threads(1)
    beta = 0.25
    target = soft_optimum(beta, 1.0)
    for gamma in (1.0, 0.5):
        discounted = soft_optimum(beta, gamma)
        for decomposed in (True, False):
            probs = [train(beta, decomposed, 50, seed=s, gamma=gamma).action_probs() for s in range(seeds)]
            tv = np.mean([0.5 * np.abs(p - target).sum() for p in probs])
            tv_discounted = np.mean([0.5 * np.abs(p - discounted).sum() for p in probs])
            best = np.mean([p[ACTIONS.index((1, 2))] for p in probs])
            print(f"β={beta} γ={gamma} decomposed={decomposed!s:5}  TV(π, π*)={tv:.4f}  "
                  f"TV(π, discounted fixed point)={tv_discounted:.4f}  π(best)={best:.3f} (π*: {target[ACTIONS.index((1, 2))]:.3f})")


if __name__ == "__main__":
    print_figures()


def test_advantages_are_whitened_over_the_whole_batch_not_per_minibatch():
    """Three actions of 1, 2 and 3 tokens with advantages [3], [0, 0], [1, 1, 1]: over the batch mean 1, std 1,
    so whitened [2], [-1, -1], [0, 0, 0]. One action per minibatch and a zero step size keep every ratio at 1, so
    each minibatch's policy loss is -mean(Â) over its tokens: -2, 1, 0, mean -1/3. Whitened per minibatch, each
    minibatch's advantages would average 0 (a loss of exactly 0)."""
    from agents.rollout import Transition

    model = TabularModel()
    rows = [[3.0], [0.0, 0.0], [1.0, 1.0, 1.0]]
    transitions = [Transition(obs_ids=np.zeros(1, np.int32), action_ids=np.zeros(len(a), np.int32),
                              logp=np.full(len(a), -np.log(VOCAB), np.float32),
                              ref_logp=np.full(len(a), -np.log(VOCAB), np.float32), reward=0.0, terminated=True,
                              truncated=False, episode_id=i, t=0, next_index=None,
                              old_logp=np.full(len(a), -np.log(VOCAB), np.float32), advantages=np.asarray(a, np.float32),
                              returns=np.zeros(len(a), np.float32), values=np.zeros(len(a), np.float32))
                   for i, a in enumerate(rows)]

    def forward(batch):  # π_θ = π_old for every token: a uniform policy and zero values
        n = max(len(t.action_ids) for t in batch)
        logp = torch.full((len(batch), n), -float(np.log(VOCAB)), requires_grad=True)
        return ForwardOutput(logp=logp, values=torch.zeros(len(batch), n, requires_grad=True))

    stats = ppo_update(transitions, forward, torch.optim.SGD(model.parameters(), lr=0.0), list(model.parameters()),
                       PPOUpdateSettings(epochs=1, minibatch_size=1, value_clip=None, target_kl=None),
                       torch.Generator().manual_seed(0))
    assert stats["gradient_steps"] == 3
    assert stats["policy_loss"] == pytest.approx(-1 / 3, abs=1e-6)
