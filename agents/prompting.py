"""Prompting baseline: zero-shot, few-shot (k demonstrations from the corpus) and reflection (the env's error and
score feedback of earlier attempts, summarised into the next prompt). No weights change.

Backends:
- ``local``: an `LMPolicy` (the tiny model, any local path or hub name);
- ``openai``: any OpenAI-compatible endpoint (vLLM, Ollama, a hosted API, or `etpo serve`) through the `openai`
  client. Configured from the environment unless set explicitly: ``ETPO_OPENAI_BASE_URL`` (else
  ``OPENAI_BASE_URL``), ``ETPO_OPENAI_MODEL``, and the key in the variable named by `api_key_env`
  (default ``OPENAI_API_KEY``; "none" is sent when unset, which local servers accept).

    agent = PromptingAgent(config=PromptingConfig(strategy="few-shot", k_shots=2))
    agent = PromptingAgent(config=PromptingConfig(backend="openai", api="chat"))   # env vars say where

An endpoint that fails (after the client's retries) yields an empty action, which the env scores as a failed
attempt with a clear message; `agent.api_errors` counts them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agents.lm import RuntimeSettings
from etpo_env.info import SUMMARY_KEYS

SYSTEM_PROMPT = ("You are an expert data scientist who writes correct, efficient Python with numpy, pandas, scipy "
                 "and scikit-learn. Reply with Python code only.")


@dataclass
class PromptingConfig:
    strategy: Literal["zero-shot", "few-shot", "reflection"] = field(default="reflection", metadata={
        "help": "zero-shot: the env prompt as is; few-shot: k corpus demos first; reflection: few-shot plus a "
                "summary of this episode's earlier attempts and their outcomes."})
    k_shots: int = field(default=2, metadata={"help": "Demonstrations shown in few-shot and reflection prompts."})
    max_reflections: int = field(default=4, metadata={"help": "Earlier attempts summarised in reflection mode."})
    backend: Literal["local", "openai"] = field(default="local", metadata={"help": "local LMPolicy or HTTP API."})
    api: Literal["chat", "completions"] = field(default="chat", metadata={"help": "HTTP endpoint flavour."})
    base_url: str | None = field(default=None, metadata={
        "help": "API base URL (default: $ETPO_OPENAI_BASE_URL or $OPENAI_BASE_URL)."})
    api_model: str | None = field(default=None, metadata={"help": "API model name (default: $ETPO_OPENAI_MODEL)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the key."})
    request_timeout_s: float = field(default=120.0, metadata={"help": "HTTP request timeout."})
    max_retries: int = field(default=2, metadata={"help": "HTTP retries (the openai client's backoff)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(default=384, metadata={"help": "Most tokens per answer."})
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings, metadata={
        "help": "Local backend: device, dtype (auto = bf16 on CUDA, fp32 on CPU), attention kernel, 4-bit base."})
    seed: int = field(default=0, metadata={"help": "Seed for demo choice and local sampling."})


# ----------------------------------------------------------------------------------------------------------------
# Prompt construction (pure functions)
# ----------------------------------------------------------------------------------------------------------------
def few_shot_block(programs: list[str]) -> str:
    if not programs:
        return ""
    shots = "\n\n".join(f"Example {i + 1}:\n```python\n{p.rstrip()}\n```" for i, p in enumerate(programs))
    return f"Examples of working solutions for other datasets:\n\n{shots}\n\n"


def reflection_block(history: list[dict]) -> str:
    """A summary of earlier attempts: what ran, what failed and why, with the scores reached."""
    if not history:
        return ""
    lines = ["Earlier attempts in this episode:"]
    for h in history:
        if h.get("status") == "ok":
            lines.append(f"- attempt {h['attempt']}: ran, ROC AUC {h['score']:.4f}.")
        else:
            reason = (h.get("message") or "").strip().splitlines()
            lines.append(f"- attempt {h['attempt']}: failed ({h.get('error_type') or h.get('status')}): "
                         f"{reason[0][:200] if reason else 'no message'}")
    lines.append("Reflect on these outcomes: avoid the errors above and change what limited the score.")
    return "\n".join(lines) + "\n\n"


def build_prompt(obs: str, shots: list[str], history: list[dict]) -> str:
    return few_shot_block(shots) + reflection_block(history) + obs


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------
class LocalBackend:
    def __init__(self, model: str | Path, cfg: PromptingConfig):
        from agents.lm import GenerationSettings, LMPolicy, load_options
        from agents.tiny import resolve_model

        self.policy = LMPolicy.from_pretrained(resolve_model(model), trainable=False, **load_options(cfg.runtime))
        self.gen = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=cfg.seed)

    def complete(self, prompt: str) -> str:
        return self.complete_batch([prompt])[0]

    def complete_batch(self, prompts: list[str]) -> list[str]:
        """One completion per prompt, generated in one batched call."""
        limit = self.policy.max_prompt_tokens(self.gen)
        ids = [self.policy.encode_observation(prompt, {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                                                    {"role": "user", "content": prompt}]},
                                              max_length=limit) for prompt in prompts]
        return [g.text for g in self.policy.generate(ids, self.gen)]


class OpenAIBackend:
    """Any OpenAI-compatible server, through the official client."""

    def __init__(self, cfg: PromptingConfig):
        from openai import OpenAI

        self.base_url = cfg.base_url or os.environ.get("ETPO_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        self.model = cfg.api_model or os.environ.get("ETPO_OPENAI_MODEL")
        if not self.base_url or not self.model:
            raise ValueError("the openai backend needs a base URL and a model: set base_url/api_model or "
                             "ETPO_OPENAI_BASE_URL/ETPO_OPENAI_MODEL")
        self.client = OpenAI(base_url=self.base_url, api_key=os.environ.get(cfg.api_key_env) or "none",
                             timeout=cfg.request_timeout_s, max_retries=cfg.max_retries)
        self.cfg = cfg

    def complete(self, prompt: str) -> str:
        cfg = self.cfg
        if cfg.api == "chat":
            response = self.client.chat.completions.create(
                model=self.model, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}])
            return response.choices[0].message.content or ""
        response = self.client.completions.create(model=self.model, prompt=prompt, temperature=cfg.temperature,
                                                  top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
        return response.choices[0].text or ""


# ----------------------------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------------------------
class PromptingAgent:
    """Prompts a fixed model; `learn` just plays episodes within the budget (in-context use of feedback only)."""

    config_class = PromptingConfig

    def __init__(self, model: str | Path = "tiny", config: PromptingConfig | None = None,
                 backend: Any = None, **overrides: Any):
        self.config = dataclasses.replace(config or self.config_class(), **overrides)
        self.model = str(model)
        cfg = self.config
        if backend is not None:
            self.backend = backend  # any object with complete(prompt) -> str
        elif cfg.backend == "openai":
            self.backend = OpenAIBackend(cfg)
        else:
            self.backend = LocalBackend(model, cfg)
        self.rng = random.Random(cfg.seed)
        self._shot_pool: list[str] | None = None
        self.history: list[dict] = []
        self.api_errors = 0
        self.env_steps = 0  # over the agent's life: `learn(env, budget)` plays up to `budget` in total
        self.last_prompt = ""
        self._last_action: str | None = None

    def _shots(self) -> list[str]:
        if self.config.strategy == "zero-shot" or self.config.k_shots <= 0:
            return []
        if self._shot_pool is None:
            from tasks import demos

            self._shot_pool = [d.program for d in demos.corpus(n=200, seed=self.config.seed, buggy_fraction=0.0)]
        return self.rng.sample(self._shot_pool, min(self.config.k_shots, len(self._shot_pool)))

    def reset(self) -> None:
        self.history = []
        self._last_action = None

    def act(self, obs: str, info: dict | None = None) -> str:
        info = info or {}
        if self.config.strategy == "reflection" and info.get("status") is not None and info.get("attempt"):
            self.history.append({k: info.get(k) for k in (*SUMMARY_KEYS, "message")})
            self.history = self.history[-self.config.max_reflections:]
        history = self.history if self.config.strategy == "reflection" else []
        return self._answer([build_prompt(obs, self._shots(), history)])[0]

    @property
    def act_batch(self) -> Callable[[list[str], list[dict]], list[str]] | None:
        """Act on several episodes at once (the benchmark's lock-step evaluation), one batched generation where the
        backend has `complete_batch`; None with the reflection strategy, whose history belongs to one episode, so
        its episodes run one by one."""
        return None if self.config.strategy == "reflection" else self._act_batch

    def _act_batch(self, observations: list[str], infos: list[dict]) -> list[str]:
        return self._answer([build_prompt(obs, self._shots(), []) for obs in observations])

    def _answer(self, prompts: list[str]) -> list[str]:
        """The backend's completions: one `complete_batch` call for several prompts where the backend has it, else
        `complete` per prompt. An unreachable or failing endpoint fails these attempts (empty programs), not the run."""
        complete_batch = getattr(self.backend, "complete_batch", None)
        try:
            actions = (complete_batch(prompts) if complete_batch is not None
                       else [self.backend.complete(prompt) for prompt in prompts])
        except Exception as exc:
            self.api_errors += len(prompts)
            self.last_error = f"{type(exc).__name__}: {exc}"
            actions = [""] * len(prompts)
        self.last_prompt, self._last_action = prompts[-1], actions[-1]
        return actions

    def learn(self, env: Any, budget: int, callbacks: Callable[[dict], Any] | Iterable[Callable] | None = None,
              out_dir: str | Path | None = None) -> dict:
        """Play episodes until `budget` env steps in total over the agent's life (as every learner counts them:
        cumulative calls continue, a repeated budget plays none); report this call's best score and the program
        that reached it. `callbacks` (one or several) receive `{"env_steps", "reward", "info"}` after every step."""
        from agents.base import play

        hooks = [callbacks] if callable(callbacks) else list(callbacks or [])
        started = time.perf_counter()
        steps = max(0, int(budget) - self.env_steps)
        result = play(env, self, steps, callback=lambda step: [hook(step) for hook in hooks])
        self.env_steps += result.steps
        summary = {"env_steps": float(result.steps), "episodes": float(result.episodes),
                   "api_errors": float(self.api_errors), "best_score": result.best_score,
                   "time_s": time.perf_counter() - started}
        if out_dir is not None:
            self.save(Path(out_dir) / "checkpoint")
            if result.best_program:
                (Path(out_dir) / "best_program.py").write_text(result.best_program)
        return summary

    def save(self, directory: str | Path) -> None:
        from agents.config import config_to_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prompting.json").write_text(json.dumps({"model": self.model,
                                                              "config": config_to_dict(self.config)}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> PromptingAgent:
        data = json.loads((Path(directory) / "prompting.json").read_text())
        config = cls.config_class(**data["config"])
        return cls(model=data["model"], config=config, **overrides)


@dataclass
class ZeroShotConfig(PromptingConfig):
    """`PromptingConfig` whose strategy defaults to zero-shot."""

    strategy: Literal["zero-shot", "few-shot", "reflection"] = field(default="zero-shot", metadata={
        "help": PromptingConfig.__dataclass_fields__["strategy"].metadata["help"]})


class ZeroShotPromptingAgent(PromptingAgent):
    """`PromptingAgent` with strategy "zero-shot" unless told otherwise: the env's prompt as is. For a model that
    learned first prompts only (the tiny model), this is the prompting baseline that asks it what it was taught;
    few-shot and reflection prompts are new to such a model."""

    config_class = ZeroShotConfig


@dataclass
class FewShotConfig(PromptingConfig):
    """`PromptingConfig` whose strategy defaults to few-shot."""

    strategy: Literal["zero-shot", "few-shot", "reflection"] = field(default="few-shot", metadata={
        "help": PromptingConfig.__dataclass_fields__["strategy"].metadata["help"]})


class FewShotPromptingAgent(PromptingAgent):
    """`PromptingAgent` with strategy "few-shot" unless told otherwise: `k_shots` corpus demonstrations, then the
    env's prompt (the registry's `prompting` adds the reflections on earlier attempts)."""

    config_class = FewShotConfig
