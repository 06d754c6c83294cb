"""The ETPO learner on a language model: its config, the critics over the LM's features, and the agent
inside the shared learner shell.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from agents.etpo.objective import pearson
from agents.etpo.update import (
    Critic,
    Packed,
    Role,
    UpdateSettings,
    ValueAdvantageCritic,
    etpo_update,
    make_optimizer,
    realised_returns,
)
from agents.learner import (
    Learner,
    LearnerConfig,
    check_sampled_generation,
)
from agents.lm import (
    GenerationSettings,
    LMPolicy,
    default_lora_config,
    load_causal_lm,
    peft_wrapping,
    tempered,
)

# ----------------------------------------------------------------------------------------------------------------
# 3. The learner on a language model.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ETPOConfig(LearnerConfig):
    """Every hyperparameter of ETPO (one schema for Python and `etpo train --agent etpo`).

    Defaults learn on the tiny model on CPU; for 0.5B–7B models lower the learning rates (1e-5–1e-4).
    """

    # the objective
    beta: float = field(default=0.05, metadata={"help": "β: KL-to-reference weight (temperature of π ∝ ρ·exp(Q/β))."})
    gamma: float = field(default=0.9, metadata={"help": "γ: discount between env steps (none inside an action)."})
    lam: float = field(default=1.0, metadata={
        "help": "λ of the soft λ-return targets, over the tokens of an action and across actions (see "
                "soft_lambda_returns). 0 = the paper's one-step backup yʲ = V(uʲ⁺¹), which moves an end-of-action "
                "reward back one token per target refresh; 1 = the Monte-Carlo soft return, which credits every "
                "token of an action at once."})
    sampled_correction: float = field(default=1.0, metadata={
        "help": "Weight c of the sampled correction in the policy loss: c·(yʲ − Q_φ(uʲ,wʲ))·(−log π_θ(wʲ|uʲ)) at "
                "every sampled token (sampled_correction_per_state), clipped as PPO clips (correction_clip). 0 = the "
                "paper: the policy follows the critic alone, and moves only as far as Q_φ has learned which tokens "
                "mattered (on the env's own reward, first-attempt validity did not move on any seed: KL to ρ ≤ 0.001). "
                "1 = an unbiased estimate of the soft objective's gradient, with Q_φ as control variate. Default 1 "
                "(clipped): ahead of or level with 0 on every seed measured of the keyword probes and of the env "
                "probe on titanic, credit_scoring and customer_churn, KL to ρ ≤ 0.04, entropy ≤ 1.3× its start "
                "(bench/learnability.py; README). Unclipped, one env seed collapsed in an earlier session."})
    correction_clip: float = field(default=0.2, metadata={
        "help": "ε of the sampled correction's trust region: the term becomes PPO's clipped surrogate with the critic's "
                "residual as advantage, −min(r·δ, clip(r, 1 − ε, 1 + ε)·δ), r = π_θ/π_old per sampled token, π_old "
                "the policy at the start of the update (same gradient as the unclipped term at r = 1; it stops "
                "pushing a token once its ratio leaves the region). 0 = unclipped: every epoch pushes the same "
                "sampled tokens again. Used only when sampled_correction > 0."})
    correction_residual: Literal["step", "update"] = field(default="step", metadata={
        "help": "Which critic the sampled correction's residual δ = yʲ − Q_φ(uʲ,wʲ) reads. step = the online critic at "
                "each optimiser step, which regresses on these very samples during the update's epochs, so δ shrinks "
                "as it fits them and the signal of a rare sample moves into the soft term, weighted by its small "
                "π(w). update = the critic that enters the update, before any step on this batch (PPO fixes its "
                "advantages the same way); the soft term still reads the online critic. Measured against step (3 seeds): "
                "start probe 0.94/0.97/0.89 against 0.89 each, middle and avoid level or behind (README), so step "
                "stays. Used only when sampled_correction > 0."})
    # critic
    critic: Literal["dueling", "head", "lm_head"] = field(default="dueling", metadata={
        "help": "Critic Q(u,·) ∈ R^|V| on the critic adapter's features h. dueling = V(u) + A(u,·): a scalar value "
                "head plus a rank-`critic_rank` map of h read out through the LM's frozen output embedding, A zero "
                "at the start (π = ρ is optimal then) and regressed on y − V, so untried tokens sit at V(u) instead "
                "of an arbitrary 0; its size does not grow with the vocabulary. head = a new zero-initialised "
                "V×H linear head (large at big vocabularies; untried tokens stay at Q = 0). lm_head = the LM's output "
                "layer under the critic adapter, times critic_scale (the paper's choice)."})
    critic_rank: int = field(default=64, metadata={"help": "Rank of the dueling critic's advantage map."})
    advantage_centring: Literal["none", "policy"] = field(default="none", metadata={
        "help": "Dueling critic only. none = Q = V + A, so a token never sampled sits at Q = V(u), the value of what "
                "π does now; as π's probability p of a rewarded token rises, V → p and the soft target's tilt "
                "exp((Q − V)/β) towards it over the untried tokens shrinks to exp((1 − p)/β), a fixed point below "
                "1 (README, Learnability). policy = Q = V + A − E_π A, so E_π Q = V exactly: the token that earned "
                "more than V pulls the rest of π's mass down with it, and the tokens π samples but rarely sees sit "
                "at what the rest of π earns, not at V (π: the policy at the last target pass). Measured against none "
                "(3 seeds; README): 0.8 in half the env steps on the start probe, level on start and middle, behind "
                "on avoid, and unstable (entropy up to 3.71× its start, KL to ρ 0.244 at one update), so none stays."})
    critic_scale: float = field(default=0.1, metadata={"help": "Scale of the LM-head logits used as Q (critic=lm_head)."})
    critic_loss: Literal["huber", "mse"] = field(default="huber", metadata={"help": "Critic regression loss."})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold δ."})
    ema_rate: float = field(default=0.05, metadata={"help": "τ: target critic φ̄ ← (1−τ)·φ̄ + τ·φ after each step."})
    # optimisation
    optimizer: Literal["adamw", "lion"] = field(default="adamw", metadata={"help": "adamw or lion."})
    policy_lr: float = field(default=5e-4, metadata={
        "help": "Learning rate of the policy adapter. 5e-4 (was 2e-4): on the env's own reward first-attempt validity "
                "rose +0.10 [0.03, 0.18] more, paired over 6 task-seeds, entropy < 2× its start (README)."})
    critic_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the critic adapter and Q head."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay (both optimisers)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip per optimiser (0 = off)."})
    epochs: int = field(default=4, metadata={
        "help": "Passes over each rollout batch. 4 (was 2): the start-of-program keyword probe reached 0.8 in 107 env "
                "steps instead of 176 (3 seeds; bench/learnability.py; README)."})
    target_refresh: Literal["epoch", "update"] = field(default="epoch", metadata={
        "help": "When the targets yʲ are computed: before every epoch, from the policy and target critic the previous "
                "epoch left (the KL terms along the path follow the policy as it moves), or once per update, from "
                "those that collected the batch (PPO's schedule for its returns; a quarter of the target passes). "
                "epoch: on titanic's demo protocol (192 env steps, 6 seeds) every seed gained (normalized score "
                "+0.19 [0.15, 0.24], per seed 0.13–0.26); once per update, +0.16 [0.06, 0.26], seed 1 +0.01 and "
                "seed 4 +0.08; level on the keyword and env probes (bench/learnability.py; README)."})
    minibatch_size: int = field(default=4, metadata={"help": "Transitions (actions) per optimiser step."})
    inference_batch_size: int = field(default=16, metadata={
        "help": "Transitions per no-gradient pass (ρ's features, the target pass): larger than a minibatch, since "
                "no graph is kept (a prompt the transitions share runs once per pass)."})
    # rollouts
    generation: GenerationSettings = field(default_factory=GenerationSettings, metadata={
        "help": "How actions are sampled. ETPO trains the sampled distribution: π = softmax(logits/temperature) "
                "and ρ at the same temperature (any temperature > 0); top_k/top_p are refused (the update sums over "
                "the whole vocabulary, so filtered samples would be off-policy)."})
    # model
    reference: str = field(default="base", metadata={"help": "Reference ρ: base (adapters off) or adapter:<name>."})

    def __post_init__(self):
        super().__post_init__()  # critic, critic_loss, optimizer: one of their choices
        if self.beta <= 0:
            raise ValueError("beta must be > 0 (it is the temperature of the soft-optimal policy)")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0 or not 0.0 < self.ema_rate <= 1.0:
            raise ValueError("gamma and lam must lie in [0, 1] and ema_rate in (0, 1]")
        if self.sampled_correction < 0 or not 0.0 <= self.correction_clip < 1.0:
            raise ValueError("sampled_correction must be >= 0 and correction_clip in [0, 1)")
        check_sampled_generation(self.generation, "ETPO")
        if min(self.epochs, self.minibatch_size, self.inference_batch_size, self.rollout_steps, self.num_envs, self.chunk_size,
               self.critic_rank, self.generation.max_new_tokens) < 1:
            raise ValueError("epochs, minibatch_size, inference_batch_size, rollout_steps, num_envs, chunk_size, critic_rank and "
                             "max_new_tokens must be >= 1")

    def update_settings(self, pad_id: int) -> UpdateSettings:
        return UpdateSettings(beta=self.beta, gamma=self.gamma, lam=self.lam, sampled_correction=self.sampled_correction,
                              correction_clip=self.correction_clip, target_refresh=self.target_refresh,
                              correction_residual=self.correction_residual,
                              epochs=self.epochs, minibatch_size=self.minibatch_size,
                              inference_batch_size=self.inference_batch_size,
                              chunk_size=self.chunk_size, critic_loss=self.critic_loss, huber_delta=self.huber_delta,
                              ema_rate=self.ema_rate, max_grad_norm=self.max_grad_norm, pad_id=pad_id)


class DuelingCritic(ValueAdvantageCritic):
    """Q(u, w) = V(u) + A(u, w) over the critic adapter's features h (see ETPOConfig.critic).

    V(u) = vᵀh + b, a scalar. A(u, ·) = E·(U·(D·h)): a rank-r map of h read out through the LM's frozen output
    embedding E (V×H, the base model's own; not a parameter here, not copied), so every token's advantage comes
    from features shared across the vocabulary and the critic's size is 2·H·r + H + 1 whatever |V|. U and v start
    at zero: Q = 0 and A = 0 at the start.
    """

    def __init__(self, hidden_size: int, rank: int, output_weight: torch.Tensor, centred: bool = False):
        super().__init__()
        self.centred = centred
        self.value = torch.nn.Linear(hidden_size, 1)
        self.down = torch.nn.Linear(hidden_size, rank, bias=False)
        self.up = torch.nn.Linear(rank, hidden_size, bias=False)
        for zero in (self.value.weight, self.value.bias, self.up.weight):
            torch.nn.init.zeros_(zero)
        self._readout = [output_weight]  # a list keeps the frozen embedding out of parameters() and state_dict()

    row_width = 1  # the loss reads V and A at the taken tokens only (`split_taken`)

    def policy_summary(self, policy_logits: torch.Tensor) -> torch.Tensor | None:
        """Centred: π's mean output embedding ē(u) = Σ_w π(w|u)·E_w ([n, H]), so that E_π A = dᵀē for the row's
        direction d, whatever d becomes as the critic trains (one [n, V] × [V, H] product per target pass)."""
        if not self.centred:
            return None
        (embedding,) = self._readout
        return (F.softmax(policy_logits.float(), -1).to(embedding.dtype) @ embedding).float()

    def split(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.float()
        (embedding,) = self._readout
        direction = self.up(self.down(hidden))
        advantage = F.linear(direction.to(embedding.dtype), embedding).float()
        if summary is not None:  # A − E_π A
            advantage = advantage - (direction.float() * summary.float()).sum(-1, keepdim=True)
        return self.value(hidden).squeeze(-1), advantage

    def split_taken(self, hidden: torch.Tensor, tokens: torch.Tensor, summary: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """V(u) and A(u, w) at the taken tokens only ([N] each): each row's direction dotted with its token's
        output embedding (less π's mean embedding when centred), the entry `split` would give, without forming
        [N, V] rows (the critic loss reads nothing else, so its cost does not grow with the vocabulary)."""
        hidden = hidden.float()
        (embedding,) = self._readout
        direction = self.up(self.down(hidden)).to(embedding.dtype).float()
        readout = embedding[tokens].float() if summary is None else embedding[tokens].float() - summary.float()
        return self.value(hidden).squeeze(-1), (direction * readout).sum(-1)


class HeadCritic(Critic):
    """Q(u, ·) = W·h + b, a new V×H linear head, zero at the start (untried tokens stay at Q = 0; see
    ETPOConfig.critic). Made on the policy's device: never a V×H fp32 copy on the host."""

    def __init__(self, hidden_size: int, vocab_size: int, device: torch.device | str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size, hidden_size, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size, device=device))

    def q_rows(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight, self.bias)


class LMHeadCritic(Critic):
    """Q(u, ·) = scale · the LM's output layer on the critic adapter's features (the paper's choice): no parameters
    of its own, the critic adapter (and any LoRA on the output layer) carries what it learns."""

    def __init__(self, output: Callable[[torch.Tensor], torch.Tensor], scale: float):
        super().__init__()
        self._output = [output]  # a list keeps the LM's layer out of this module's parameters and state_dict
        self.scale = scale

    def q_rows(self, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        (output,) = self._output
        return self.scale * output(hidden).float()


_ADAPTER_OF = {"policy": "policy", "reference": None, "critic": "critic", "target": "critic"}  # role -> adapter


class LMTokenModels:
    """`TokenModels` over one LMPolicy: π = "policy" adapter, ρ = reference, Q_φ = "critic" adapter + Q head.

    The target critic Q_φ̄ is not a third adapter: its EMA tensors are swapped into the critic's parameters for the
    duration of a no-grad forward (pointer swaps, no copy), so only one extra copy of the critic's own parameters
    exists — never of the base model.
    """

    def __init__(self, policy: Any, cfg: ETPOConfig):
        self.policy, self.cfg = policy, cfg
        hf = policy.hf_model
        output = hf.get_output_embeddings()
        base_output = getattr(output, "base_layer", output)  # the frozen weight under any LoRA on the output layer
        self.vocab_size = int(base_output.weight.shape[0])  # the width of every head's rows
        # π and ρ score with the model's own logits (its final transform, e.g. softcapping, as generation does);
        # the critic that reuses the output layer takes its raw result
        if hasattr(output, "lora_A"):  # LoRA on the output layer: each role needs its own adapter state
            self._lm_heads = {"policy": policy.head("policy"), "reference": policy.head(None)}
            critic_output = policy.head("critic", transform=False)
        else:  # the output layer is shared and frozen: apply it directly, no adapter switching per chunk
            policy.check_head()
            shared = lambda h: policy.final_logits(output(h))  # noqa: E731
            self._lm_heads, critic_output = {"policy": shared, "reference": shared}, output
        for role in ("policy", "reference"):  # π is the sampled distribution softmax(logits/T), ρ at the same T
            self._lm_heads[role] = tempered(self._lm_heads[role], float(cfg.generation.temperature))
        self.critic = self._make_critic(cfg, hf.config.hidden_size, base_output.weight.detach(), critic_output)
        self.critic.to(policy.device, torch.float32)
        # listed once: the target critic is swapped in for every target head chunk, and a walk over the model's
        # parameters each time cost more than the swap
        self._policy_params = policy.trainable_parameters("policy")
        self._critic_params = policy.trainable_parameters("critic") + list(self.critic.parameters())
        self.target = [p.detach().clone() for p in self.critic_parameters()]

    def _make_critic(self, cfg: ETPOConfig, hidden_size: int, output_weight: torch.Tensor,
                     critic_output: Callable[[torch.Tensor], torch.Tensor]) -> Critic:
        """The one place the kind of critic is read (ETPOConfig.critic)."""
        if cfg.critic == "dueling":
            return DuelingCritic(hidden_size, cfg.critic_rank, output_weight, cfg.advantage_centring == "policy")
        if cfg.critic == "head":
            return HeadCritic(hidden_size, self.vocab_size, self.policy.device)
        return LMHeadCritic(critic_output, cfg.critic_scale)

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._policy_params)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._critic_params)

    def target_parameters(self) -> list[torch.Tensor]:
        return self.target

    def _swap_target(self) -> None:
        for p, t in zip(self.critic_parameters(), self.target, strict=True):
            p.data, t.data = t.data, p.data

    def _with_target(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("the target critic is evaluated without gradients only")
        self._swap_target()
        try:
            return fn()
        finally:
            self._swap_target()

    def hidden(self, role: Role, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids → [B, L, H] features of the whole padded batch (`rows` is what the update uses)."""
        run = lambda: self.policy.hidden_states(input_ids, attention_mask, _ADAPTER_OF[role])  # noqa: E731
        return self._with_target(run) if role == "target" else run()

    def rows(self, role: Role, packed: Packed) -> torch.Tensor:
        """The features of `packed`'s token states from `LMPolicy.action_states` (a prompt that several of its
        pairs share runs once)."""
        prompts, actions = [list(o) for o, _ in packed.pairs], [list(a) for _, a in packed.pairs]
        run = lambda: self.policy.action_states(prompts, actions, _ADAPTER_OF[role])  # noqa: E731
        return self._with_target(run) if role == "target" else run()

    def head(self, role: Role, hidden: torch.Tensor, summary: torch.Tensor | None = None) -> torch.Tensor:
        if role in ("policy", "reference"):
            return self._lm_heads[role](hidden)
        run = lambda: self.critic.q_rows(hidden, summary)  # noqa: E731
        return self._with_target(run) if role == "target" else run()


def critic_state_bytes(models: LMTokenModels) -> int:
    """Memory of the critic's training state: its trainable parameters in fp32 with their gradients and AdamW's
    two moments (4 copies), plus the EMA target. The base model and the policy adapter are not counted."""
    trainable = sum(p.numel() for p in models.critic_parameters()) * 4 * 4
    return trainable + sum(t.numel() * t.element_size() for t in models.target)


def lm_policy_from_config(hf_config: Any, lora_r: int = 8, lora_alpha: int = 16, device: str = "cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """An LMPolicy with "policy" and "critic" LoRA adapters over a randomly initialised model built from a
    transformers config (no download): for benchmarks of shapes no local checkpoint has."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config)
    finally:
        torch.set_default_dtype(default)
    with peft_wrapping():
        model = get_peft_model(model, default_lora_config(r=lora_r, alpha=lora_alpha), adapter_name="policy")
    model.add_adapter("critic", default_lora_config(r=lora_r, alpha=lora_alpha))
    model.set_adapter("policy")
    for name, p in model.named_parameters():
        p.requires_grad_(".policy." in name or ".critic." in name)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)  # only the pad id is needed for updates
    policy = LMPolicy(model, tokenizer, device=device, name_or_path=f"<config:{hf_config.model_type}>")
    policy.upcast_trainable_to_fp32()
    return policy


class ETPOAgent(Learner):
    """ETPO on an `LMPolicy`: one base model carrying a "policy" and a "critic" LoRA adapter (see the module doc).

    The learner shell (agents/learner.py) collects `rollout_steps` env steps; `train` is one ETPO update on them.
    """

    config_class = ETPOConfig

    def adapters(self) -> tuple[dict[str, Any], str]:
        cfg = self.config
        return ({"policy": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha),
                 "critic": default_lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha)}, cfg.reference)

    def setup(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.models = LMTokenModels(self.policy, cfg)
        self.policy_opt = make_optimizer(self.models.policy_parameters(), cfg.optimizer, cfg.policy_lr,
                                         cfg.weight_decay)
        self.critic_opt = make_optimizer(self.models.critic_parameters(), cfg.optimizer, cfg.critic_lr,
                                         cfg.weight_decay)
        self.rng = random.Random(cfg.seed)  # minibatch order
        self.best_reward = -math.inf

    def train(self, buffer: Sequence[Any]) -> dict[str, float]:
        """One ETPO update on a rollout buffer (the soft Bellman targets, the critic and policy steps), with the
        diagnostics a reviewer needs."""
        cfg = self.config
        transitions = list(buffer)
        tick = time.perf_counter()
        first_q: dict[int, float] = {}
        update = etpo_update(self.models, transitions, cfg.update_settings(self.policy.pad_id), self.policy_opt,
                             self.critic_opt, self.rng, device=self.policy.device, first_q_out=first_q)
        time_update = time.perf_counter() - tick

        n_tokens = sum(len(t.action_ids) for t in transitions)
        rewards = np.array([t.reward for t in transitions], dtype=np.float64)
        self.best_reward = max(self.best_reward, float(rewards.max()))
        returns = realised_returns(transitions, cfg.gamma)
        q_first = [first_q.get(i, float("nan")) for i in range(len(transitions))]
        statuses = [t.info.get("status") for t in transitions]
        return {  # reward_mean and reward_max: the collector's (agents/rollout.py), one computation for every learner
            "success_rate": float(np.mean([s == "ok" for s in statuses])) if any(statuses) else float("nan"),
            "best_reward": self.best_reward,
            "q_return_corr": pearson(torch.tensor(q_first), torch.tensor(returns)),
            "tokens_per_action": n_tokens / len(transitions),
            "kl_to_reference": update.get("kl", float("nan")),  # the name every learner logs KL(π‖ρ) per token under
            "time_update_s": time_update,
            "update_tokens_per_s": update.get("tokens_updated", 0.0) / time_update if time_update > 0 else 0.0,
            **update,
        }

    def state_dict(self) -> dict[str, Any]:
        """Q head, EMA target, both optimisers, the minibatch RNG and the best reward (adapters travel with the
        policy)."""
        return {
            "q_head": self.models.critic.state_dict(),  # the critic's own parameters (none for lm_head)
            "target": [t.cpu() for t in self.models.target],
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "best_reward": self.best_reward,
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.critic.load_state_dict(state["q_head"] or {})  # None: a checkpoint of an lm_head critic
        with torch.no_grad():
            for t, saved in zip(self.models.target, state["target"], strict=True):
                t.copy_(saved)
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.best_reward = float(state["best_reward"])
        self.rng.setstate(state["rng"])

    def export_policy(self, directory: str | Path) -> Path:
        """Write π alone as a plain transformers model (policy adapter merged into the base) plus tokenizer, for
        `etpo serve`, `agents.tiny_evaluation.evaluate_samples` or any `from_pretrained` user. The agent is left untouched."""
        from peft import PeftModel

        directory = Path(directory)
        adapter_dir = directory / "_policy_adapter"
        self.policy.model.save_pretrained(str(adapter_dir), selected_adapters=["policy"])
        if not (adapter_dir / "adapter_config.json").exists():
            adapter_dir = adapter_dir / "policy"  # peft puts non-default adapters in a sub-directory
        dtype = self.policy.weights_dtype  # a 4-bit run exports a merged model in its compute dtype
        base = load_causal_lm(self.model_path, dtype=dtype)
        with peft_wrapping():
            merged = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="policy").merge_and_unload()
        merged.save_pretrained(str(directory))
        self.policy.tokenizer.save_pretrained(str(directory))
        shutil.rmtree(directory / "_policy_adapter")
        return directory
