"""Agent protocol, reference agents, agent loading and the dataclass <-> argparse config helper."""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest

import agents
from agents import base, config


def test_scripted_and_callable_agents_follow_the_protocol():
    scripted = base.ScriptedAgent("def build_model(X, y): pass")
    assert isinstance(scripted, base.Agent)
    assert scripted.act("prompt", {}) == "def build_model(X, y): pass"
    one_arg = base.as_agent(lambda obs: obs.upper())
    two_args = base.as_agent(lambda obs, info: f"{obs}:{info.get('attempt')}")
    assert one_arg.act("abc", {}) == "ABC"
    assert two_args.act("abc", {"attempt": 2}) == "abc:2"
    with pytest.raises(TypeError):
        base.as_agent(lambda obs: 3).act("x", {})
    with pytest.raises(TypeError):
        base.as_agent(42)


def test_random_program_agent_is_seeded_and_draws_from_its_programs():
    programs = [f"p{i}" for i in range(20)]
    a = base.RandomProgramAgent(seed=3, programs=programs)
    b = base.RandomProgramAgent(seed=3, programs=programs)
    draws_a = [a.act("", {}) for _ in range(30)]
    assert draws_a == [b.act("", {}) for _ in range(30)]
    assert set(draws_a) <= set(programs) and len(set(draws_a)) > 5


def test_build_agent_by_name_and_by_module_class(tmp_path, monkeypatch):
    # A user-written agent class that lives outside the repository, loaded by "module:Class".
    (tmp_path / "my_user_agent.py").write_text(textwrap.dedent("""
        class Constant:
            def __init__(self, text="def build_model(X, y):\\n    return None"):
                self.text = text
            def reset(self):
                pass
            def act(self, obs, info):
                return self.text
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    user = agents.build_agent("my_user_agent:Constant", seed=3)
    assert isinstance(user, base.Agent) and user.act("o", {}).startswith("def build_model")
    assert agents.build_agent("scripted").act("o", {}) == base.SCRIPTED_PROGRAM
    assert agents.build_agent("random", seed=5).seed == 5
    assert set(agents.AGENTS) == {"etpo", "ppo", "grpo", "sft", "prompting", "zero-shot", "few-shot", "random",
                                  "scripted"}
    with pytest.raises(ValueError, match="unknown agent"):
        agents.build_agent("no-such-agent")
    with pytest.raises(ValueError, match="no attribute"):
        agents.build_agent("my_user_agent:Missing")
    with pytest.raises(ValueError, match="no config"):
        agents.build_agent("my_user_agent:Constant", overrides=["text=X"])
    sys.modules.pop("my_user_agent", None)


def test_user_agent_runs_an_episode_in_a_scripted_env():
    class CountdownEnv:
        def reset(self, seed=None):
            self.left = 3
            return "prompt", {}

        def step(self, action):
            self.left -= 1
            return "feedback", float(len(action)), self.left == 0, False, {"score": 0.1 * self.left}

    result = base.run_episode(CountdownEnv(), lambda obs: "abcd")
    assert result == {"return": 12.0, "steps": 3, "best_score": pytest.approx(0.2),
                      "last_info": {"score": 0.0}}


@dataclass
class _Cfg:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "number of steps"})
    use_lora: bool = field(default=True, metadata={"help": "train LoRA adapters"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    stop: tuple[str, ...] = field(default=("\n\n",), metadata={"help": "stop strings"})
    path: str | None = field(default=None, metadata={"help": "optional path"})


def test_config_round_trips_through_argparse_overrides_and_json(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    config.add_dataclass_arguments(parser, _Cfg)
    assert "learning rate" in parser.format_help()
    args = parser.parse_args(["--lr", "0.5", "--use-lora", "false", "--mode", "b", "--stop", "x,y",
                              "--set", "steps=7", "--set", "path=/tmp/a"])
    cfg = config.apply_overrides(config.dataclass_from_args(_Cfg, args), args.set)
    assert cfg == _Cfg(lr=0.5, steps=7, use_lora=False, mode="b", stop=("x", "y"), path="/tmp/a")
    untouched = config.dataclass_from_args(_Cfg, parser.parse_args([]))
    assert untouched == _Cfg()
    config.save_config(cfg, tmp_path / "c.json")
    assert config.load_config(_Cfg, tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        config.apply_overrides(cfg, ["nope=1"])
    with pytest.raises(ValueError, match="expected one of"):
        config.apply_overrides(cfg, ["mode=c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many"])


def test_random_program_agent_draws_from_the_demonstration_corpus():
    from tasks import demos

    agent = base.RandomProgramAgent(seed=0, corpus_size=50)
    corpus = {d.program for d in demos.corpus(n=50, seed=0, buggy_fraction=0.2)}
    draws = {agent.act("prompt", {}) for _ in range(40)}
    assert draws <= corpus and len(draws) > 10


class _Configured:
    config_class = _Cfg

    def __init__(self, model="tiny", config=None):
        self.model, self.config = model, config

    def reset(self):
        pass

    def act(self, obs, info):
        return obs


def test_build_agent_accepts_a_class_a_callable_and_typed_overrides():
    agent = agents.build_agent(_Configured, seed=1, model=lambda: "m", overrides=["lr=0.25", "mode=b"])
    assert (agent.model, agent.config.lr, agent.config.mode) == ("m", 0.25, "b")
    assert agents.build_agent(_Configured, overrides={"steps": "4"}).config.steps == 4  # text is typed by the field
    with pytest.raises(ValueError, match="unknown config key"):
        agents.build_agent(_Configured, overrides=["nonsense=1"])
    wrapped = agents.build_agent(lambda obs: obs[::-1])
    assert wrapped.act("abc", {}) == "cba"


def test_check_options_needs_some_agent_to_have_each_key():
    from agents.registry import check_options, options_for

    check_options([_Configured, "scripted"], {"lr": "0.1"})  # scripted has no config: the option skips it
    assert options_for("scripted", {"lr": "0.1"}) == {} and options_for(_Configured, {"lr": "0.1"}) == {"lr": "0.1"}
    with pytest.raises(ValueError, match="Valid keys") as error:
        check_options([_Configured, "scripted"], {"nonsense": "1"})
    assert "lr" in str(error.value)
    with pytest.raises(ValueError, match="bad value for steps"):
        check_options([_Configured], {"steps": "many"})


def test_play_spends_steps_across_episodes_and_accepts_a_callable():
    class ThreeStepEnv:
        resets: list = []

        def reset(self, seed=None):
            self.resets.append(seed)
            self.t = 0
            return "prompt", {}

        def step(self, action):
            self.t += 1
            return "feedback", 1.0, self.t == 3, False, {"score": 0.1 * self.t, "program": action}

    env = ThreeStepEnv()
    seen = []
    result = base.play(env, lambda obs: "p", 7, seed=4, callback=seen.append)
    assert (result.steps, result.episodes, result.total_reward) == (7, 3, 7.0)
    assert env.resets == [4, None, None] and [s["env_steps"] for s in seen] == list(range(1, 8))
    assert result.best_score == pytest.approx(0.3) and result.best_program == "p"
    assert base.play(ThreeStepEnv(), lambda obs: "p", episodes=2).steps == 6


def test_every_learner_config_extends_the_one_base_and_declares_its_fields_once():
    import dataclasses

    from agents.etpo import ETPOConfig
    from agents.grpo import GRPOConfig
    from agents.learner import LearnerConfig
    from agents.ppo import PPOConfig
    from agents.sft import SFTConfig

    base = {f.name: f for f in dataclasses.fields(LearnerConfig)}
    assert {"rollout_steps", "num_envs", "generation", "lora_r", "lora_alpha", "runtime", "chunk_size", "seed",
            "checkpoints"} <= set(base)
    for config_class in (ETPOConfig, PPOConfig, GRPOConfig, SFTConfig):
        assert issubclass(config_class, LearnerConfig)
        # a shared field is redeclared only as TRL's configs do: the same type, another default or help text
        for name in set(base) & set(config_class.__dict__.get("__annotations__", {})):
            own = next(f for f in dataclasses.fields(config_class) if f.name == name)
            assert own.type == base[name].type, (config_class, name)
            assert (own.default, own.default_factory, own.metadata) != (
                base[name].default, base[name].default_factory, base[name].metadata), (config_class, name)
        # every Literal-typed field is checked by the base: a bad value names the field
        for declared in dataclasses.fields(config_class):
            if "Literal" in str(declared.type):
                with pytest.raises(ValueError, match=declared.name):
                    config_class(**{declared.name: "no-such-choice"})
