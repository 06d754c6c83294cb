"""The ETPO critic: untried tokens are anchored at the state's value, not at an arbitrary 0, and the critic's size
does not grow with the vocabulary.

The toy: one state, a reference ρ peaked on three tokens, one-token actions, every sampled action scored −1 (a failed
program). With a Q table starting at 0, the improvement target ρ·exp(Q/β) pushes the whole mass of the tried tokens
onto tokens nobody tried (Q = 0 > −1). With Q = V + A (A regressed on y − V), V absorbs the failure, untried tokens
sit at V too, and nothing moves; a rewarded token still gains. The same holds for the learner's own low-rank
`DuelingCritic` module (A shared across tokens through an output embedding), whose V is what keeps the untried
tokens in place: without it, A alone sends the tried tokens' mass to an untried one.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from torch.func import functional_call

from agents.etpo import (
    DuelingCritic,
    ETPOConfig,
    LMTokenModels,
    UpdateSettings,
    ValueAdvantageCritic,
    critic_state_bytes,
    etpo_update,
    make_optimizer,
)
from tests.test_etpo_math import TabularModels, transition

VOCAB, OBS, BETA = 12, [3], 0.05


class TableDueling(ValueAdvantageCritic):
    """V and A as tables: the feature is the token state's row."""

    def __init__(self, value: torch.nn.Parameter, advantage: torch.nn.Parameter):
        super().__init__()
        self.value, self.advantage = value, advantage

    def split(self, hidden, summary=None):
        rows = hidden[..., 0].long()
        return self.value[rows], self.advantage[rows]


class FeatureDueling(ValueAdvantageCritic):
    """A `DuelingCritic` module on fixed per-state feature vectors."""

    def __init__(self, module: DuelingCritic, features: torch.Tensor):
        super().__init__()
        self.module, self.features = module, features

    def policy_summary(self, policy_logits):
        return self.module.policy_summary(policy_logits)

    def split(self, hidden, summary=None):
        return self.module.split(self.features[hidden[..., 0].long()], summary)

    def split_taken(self, hidden, tokens, summary=None):
        return self.module.split_taken(self.features[hidden[..., 0].long()], tokens, summary)


class DuelingTabular(TabularModels):
    """The tabular toy with Q = V(u) + A(u, w): a V table and an A table, both starting at zero."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.value = torch.nn.Parameter(torch.zeros(self.capacity))
        self.value_target = torch.zeros(self.capacity)
        self.critic = TableDueling(self.value, self.q)

    def head(self, role, hidden, summary=None):
        if role in ("critic", "target"):
            rows = hidden[..., 0].long()
            value, advantage = ((self.value, self.q) if role == "critic" else (self.value_target, self.q_target))
            return value[rows][:, None] + advantage[rows]
        return super().head(role, hidden)

    def critic_parameters(self):
        return [self.value, self.q]

    def target_parameters(self):
        return [self.value_target, self.q_target]


class DuelingModuleTabular(TabularModels):
    """The tabular toy with the learner's own `DuelingCritic` module: each state has a fixed random feature vector,
    the "output embedding" is a fixed random V×H matrix, so A is low-rank and shared across tokens as in the LM (a
    change made for the tried tokens moves the untried ones' A too); the target is an EMA copy of its parameters."""

    def __init__(self, hidden: int = 16, rank: int = 4, seed: int = 0, centred: bool = False, **kwargs):
        super().__init__(**kwargs)
        generator = torch.Generator().manual_seed(seed + 1)
        self.features = torch.randn(self.capacity, hidden, generator=generator)
        embedding = torch.randn(self.vocab, hidden, generator=generator) / hidden ** 0.5
        torch.manual_seed(seed)
        self.module = DuelingCritic(hidden, rank, embedding, centred)
        self.critic = FeatureDueling(self.module, self.features)
        self.names = [name for name, _ in self.module.named_parameters()]
        self.target = [p.detach().clone() for p in self.module.parameters()]

    def _features(self, hidden):
        return self.features[hidden[..., 0].long()]

    def head(self, role, hidden, summary=None):
        if role in ("critic", "target"):
            weights = None if role == "critic" else dict(zip(self.names, self.target, strict=True))
            features = self._features(hidden)
            return (self.module(features, summary) if weights is None
                    else functional_call(self.module, weights, (features, summary)))
        return super().head(role, hidden)

    def critic_parameters(self):
        return list(self.module.parameters())

    def target_parameters(self):
        return self.target


def improved_policy(models, rewards: dict[int, float], updates: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.full((VOCAB,), -4.0)
    logits[:3] = torch.tensor([2.0, 1.5, 1.0])  # ρ puts ~97% on tokens 0..2
    models.set_row(OBS, reference=logits.tolist(), policy=logits.tolist())
    batch = [transition(OBS, [w], r, True) for w, r in rewards.items() for _ in range(2)]
    settings = UpdateSettings(beta=BETA, gamma=0.9, epochs=1, minibatch_size=len(batch), chunk_size=64,
                              critic_loss="mse", ema_rate=0.5, max_grad_norm=0.0)
    pol_opt = make_optimizer(models.policy_parameters(), "adamw", 0.05, 0.0)
    crit_opt = make_optimizer(models.critic_parameters(), "adamw", 0.05, 0.0)
    rng = random.Random(0)
    for _ in range(updates):
        etpo_update(models, batch, settings, pol_opt, crit_opt, rng)
    return models.probs("policy", OBS), models.probs("reference", OBS)


def untried_mass(probs: torch.Tensor, tried) -> float:
    mask = torch.ones(VOCAB, dtype=torch.bool)
    mask[list(tried)] = False
    return float(probs[mask].sum())


@pytest.mark.slow
def test_after_only_failures_no_probability_flows_to_untried_tokens():
    tried = {0: -1.0, 1: -1.0, 2: -1.0}
    pi, rho = improved_policy(DuelingTabular(vocab=VOCAB), tried)
    assert untried_mass(pi, tried) <= untried_mass(rho, tried) + 0.01, (pi, rho)
    # the zero-anchored Q table this replaces: the tried tokens' mass leaves for tokens nobody tried
    pi0, rho0 = improved_policy(TabularModels(vocab=VOCAB), tried)
    assert untried_mass(pi0, tried) > 0.5


@pytest.mark.slow
def test_a_rewarded_token_still_gains_with_the_dueling_critic():
    pi, rho = improved_policy(DuelingTabular(vocab=VOCAB), {0: -1.0, 1: 1.0, 2: -1.0})
    assert pi[1] > 0.9 > rho[1]
    assert pi[0] < rho[0] and pi[2] < rho[2]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_learners_low_rank_dueling_critic_sends_no_probability_to_untried_tokens_after_failures(seed):
    tried = {0: -1.0, 1: -1.0, 2: -1.0}
    pi, rho = improved_policy(DuelingModuleTabular(vocab=VOCAB, seed=seed), tried)
    assert untried_mass(pi, tried) <= untried_mass(rho, tried) + 0.01, (pi, rho)
    pi, rho = improved_policy(DuelingModuleTabular(vocab=VOCAB, seed=seed), {0: -1.0, 1: 1.0, 2: -1.0})
    assert pi[1] > 0.9 > rho[1]


@pytest.mark.parametrize("critic,fits", [("dueling", True), ("head", False)])
def test_the_critic_of_a_7b_152k_vocabulary_model_fits_in_one_gigabyte(critic, fits):
    """Counted on the meta device (no memory is allocated): Qwen2-7B's shape, LoRA rank 8 on every linear layer."""
    from transformers import Qwen2Config

    from agents.etpo import lm_policy_from_config

    shape = Qwen2Config(vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4)
    policy = lm_policy_from_config(shape, lora_r=8, device="meta", dtype=torch.bfloat16)
    models = LMTokenModels(policy, ETPOConfig(critic=critic))
    assert (critic_state_bytes(models) <= 2**30) is fits, critic_state_bytes(models) / 2**30


def test_the_critic_loss_reads_the_taken_tokens_without_vocabulary_rows():
    """`split_taken` gives the entries of `split` at the taken tokens, and the critic's loss and gradients
    through it equal those through the full [N, V] rows (the path it replaces)."""
    from transformers import LlamaConfig

    from agents.etpo import critic_pass, lm_policy_from_config, pack

    shape = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    models = LMTokenModels(lm_policy_from_config(shape, lora_r=2), ETPOConfig(critic="dueling"))
    torch.manual_seed(1)
    with torch.no_grad():  # away from the zero start, where every A is 0 whichever path computes it
        for p in models.critic_parameters():
            p.normal_(0, 0.5)
    packed = pack([([5, 9, 2], [33, 17, 40]), ([7, 3], [12, 60])], pad_id=0, device="cpu")
    targets = torch.linspace(-1.0, 1.0, packed.tokens.shape[0])

    hidden = torch.randn(packed.tokens.shape[0], 16)
    value, advantage = models.critic.split_taken(hidden, packed.tokens)
    full_value, full_advantage = models.critic.split(hidden)
    torch.testing.assert_close(value, full_value)
    torch.testing.assert_close(advantage, full_advantage.gather(-1, packed.tokens[:, None]).squeeze(-1))

    def loss_and_grads():
        loss, _ = critic_pass(models, packed, targets, chunk_size=2)
        grads = torch.autograd.grad(loss, models.critic_parameters())
        return loss.detach(), grads

    taken_loss, taken_grads = loss_and_grads()
    models.critic.split_taken = functools.partial(ValueAdvantageCritic.split_taken, models.critic)  # full rows
    full_loss, full_grads = loss_and_grads()
    torch.testing.assert_close(taken_loss, full_loss)
    assert float(taken_loss) > 0
    for taken_grad, full_grad in zip(taken_grads, full_grads, strict=True):
        torch.testing.assert_close(taken_grad, full_grad)
    assert any(float(g.abs().sum()) > 0 for g in taken_grads)


def test_the_centred_dueling_critic_has_e_pi_q_equal_to_v_and_reads_taken_tokens_as_its_rows():
    """Centred under π, Q = V + A − E_π A: Σ_w π(w|u)·Q(u, w) = V(u) at every state for any parameters and any π,
    the uncentred Q differs from it by E_π A only (a per-state constant), and `split_taken` gives `split`'s entries."""
    torch.manual_seed(0)
    hidden, rank, vocab, n = 16, 4, 23, 7
    embedding = torch.randn(vocab, hidden)
    centred = DuelingCritic(hidden, rank, embedding, centred=True)
    plain = DuelingCritic(hidden, rank, embedding)
    with torch.no_grad():
        for p in centred.parameters():
            p.normal_(0, 0.5)
    plain.load_state_dict(centred.state_dict())
    with torch.no_grad():  # values, not gradients, are compared
        features, logits = torch.randn(n, hidden), 2 * torch.randn(n, vocab)
        pi = torch.softmax(logits, -1)
        summary = centred.policy_summary(logits)
        assert plain.policy_summary(logits) is None
        torch.testing.assert_close(summary, pi @ embedding)
        value, _ = centred.split(features, summary)
        q = centred.q_rows(features, summary)
        torch.testing.assert_close((pi * q).sum(-1), value, atol=1e-5, rtol=1e-5)
        q_plain = plain.q_rows(features)
        shift = (pi * (q_plain - value[:, None])).sum(-1)  # E_π A
        assert float(shift.abs().min()) > 1e-3  # the parameters are away from A = 0, so centring changes Q
        torch.testing.assert_close(q, q_plain - shift[:, None], atol=1e-5, rtol=1e-5)
        tokens = torch.randint(0, vocab, (n,))
        taken_value, taken_advantage = centred.split_taken(features, tokens, summary)
        full_value, full_advantage = centred.split(features, summary)
        torch.testing.assert_close(taken_value, full_value)
        torch.testing.assert_close(taken_advantage, full_advantage.gather(-1, tokens[:, None]).squeeze(-1))


def on_policy_bandit(centred: bool, seed: int, updates: int = 60, batch: int = 16) -> list[float]:
    """π(rewarded token) after each on-policy update of the soft term alone (no sampled correction): one state,
    ρ flat over 12 tokens but for the rewarded one (ρ ≈ 0.2), reward 1 for it and 0 for every other; 16 tokens
    drawn from π per update, so most of the other tokens go unsampled for many updates."""
    models = DuelingModuleTabular(vocab=VOCAB, seed=seed, centred=centred)
    logits = torch.zeros(VOCAB)
    logits[1] = 1.0
    models.set_row(OBS, reference=logits.tolist(), policy=logits.tolist())
    settings = UpdateSettings(beta=BETA, gamma=0.9, lam=1.0, epochs=4, minibatch_size=4, chunk_size=64)
    pol_opt = make_optimizer(models.policy_parameters(), "adamw", 0.05, 0.0)
    crit_opt = make_optimizer(models.critic_parameters(), "adamw", 0.05, 0.0)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    trajectory = []
    for _ in range(updates):
        sampled = torch.multinomial(models.probs("policy", OBS), batch, replacement=True, generator=generator)
        etpo_update(models, [transition(OBS, [w], float(w == 1), True) for w in sampled.tolist()], settings,
                    pol_opt, crit_opt, rng)
        trajectory.append(float(models.probs("policy", OBS)[1]))
    return trajectory


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_centred_under_pi_the_rewarded_token_reaches_the_soft_optimum_where_the_plain_dueling_critic_stalls(seed):
    """The soft optimum ρ·exp(Q/β)/Z puts 1 − 8e−9 on the rewarded token (Q = 1 against 0, β = 0.05). The plain
    dueling critic values the tokens it has not sampled lately at V ≈ π(rewarded), so its target's tilt towards the
    rewarded token shrinks as it is learned and π wanders below the optimum; centred under π, the mass π keeps off the
    rewarded token is valued at what it earns (0), and π settles at the optimum."""
    centred = on_policy_bandit(True, seed)[30:]
    plain = on_policy_bandit(False, seed)[30:]
    assert min(centred) > 0.99, centred
    assert sum(plain) / len(plain) < min(centred) - 0.01, plain
