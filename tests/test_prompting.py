"""Prompting baseline (zero-shot, few-shot, reflection) and its HTTP backend against `etpo serve` on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from agents.lm import GenerationSettings, LMPolicy
from agents.prompting import PromptingAgent, PromptingConfig, build_prompt, reflection_block
from agents.serve import make_server
from tests.fixtures_lm import ScriptedTextEnv


class RecordingBackend:
    def __init__(self, answer: str = "\n    return 1234"):  # 16 characters
        self.prompts: list[str] = []
        self.answer = answer

    def complete(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answer


def test_prompt_construction():
    assert build_prompt("OBS", [], []) == "OBS"
    few = build_prompt("OBS", ["def build_model(X, y):\n    return 1", "P2"], [])
    assert few.endswith("OBS") and "Example 1:" in few and "Example 2:\n```python\nP2\n```" in few
    text = reflection_block([{"attempt": 1, "status": "runtime_error", "error_type": "ValueError",
                              "message": "could not convert string to float: 'male'\nmore"},
                             {"attempt": 2, "status": "ok", "score": 0.8123}])
    assert "attempt 1: failed (ValueError): could not convert string to float: 'male'" in text
    assert "attempt 2: ran, ROC AUC 0.8123." in text


@pytest.mark.parametrize("strategy,shots", [("zero-shot", 0), ("few-shot", 3), ("reflection", 3)])
def test_strategies_shape_the_prompt_and_reflection_uses_env_feedback(strategy, shots):
    backend = RecordingBackend()
    agent = PromptingAgent(config=PromptingConfig(strategy=strategy, k_shots=3), backend=backend)
    env = ScriptedTextEnv(length=3)
    summary = agent.learn(env, budget=3)
    assert summary["env_steps"] == 3 and len(backend.prompts) == 3
    for prompt, obs in zip(backend.prompts, env.emitted):
        assert prompt.endswith(obs)
        assert prompt.count("```python") == shots
    has_history = ["Earlier attempts in this episode" in p for p in backend.prompts]
    assert has_history == ([False, True, True] if strategy == "reflection" else [False, False, False])
    if strategy == "reflection":  # the scripted env says odd-length actions fail: 16 chars -> "ok", score 0.16
        assert "attempt 1: ran, ROC AUC 0.1600." in backend.prompts[1]
        assert "attempt 2: ran" in backend.prompts[2]


def test_unreachable_endpoint_is_a_failed_attempt_not_a_crash():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = PromptingAgent(config=PromptingConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1",
                                                  api_model="x", max_retries=0, request_timeout_s=5))
    assert agent.act("prompt", {}) == "" and agent.api_errors == 1


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    server = make_server(policy, "127.0.0.1", 0, name="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield policy, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_prompting_over_http_matches_the_local_policy(served, api):
    policy, base_url = served
    cfg = PromptingConfig(strategy="zero-shot", backend="openai", api=api, base_url=base_url, api_model="tiny",
                          temperature=0.0, max_new_tokens=12)
    agent = PromptingAgent(config=cfg)
    obs = "The dataset has 120 rows and 7 features.\n\ndef build_model(X, y):"
    answer = agent.act(obs, {})
    assert agent.api_errors == 0
    local = policy.generate([policy.encode(obs)], GenerationSettings(max_new_tokens=12, temperature=0))[0]
    assert answer == local.text  # greedy: the server returns exactly what the policy generates


def test_server_protocol_details(served):
    _, base_url = served

    def post(path, body):
        request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    with urllib.request.urlopen(base_url + "/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"
    status, body = post("/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 4, "n": 2,
                                         "temperature": 0.7, "seed": 1})
    assert status == 200 and len(body["choices"]) == 4 and body["object"] == "text_completion"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    free = post("/completions", {"prompt": "def build_model(X, y):", "max_tokens": 12, "temperature": 0})[1]
    text = free["choices"][0]["text"]
    if len(text) > 3:  # the stop sequence is cut from the returned text, as the OpenAI API does
        stop = text[2:4]
        cut = post("/completions", {"prompt": "def build_model(X, y):", "max_tokens": 12, "temperature": 0,
                                    "stop": [stop]})[1]["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]
    assert post("/completions", {"prompt": 3})[0] == 400
    assert post("/chat/completions", {"messages": "hi"})[0] == 400
    assert post("/completions", {"prompt": "a", "stream": True})[0] == 400
    assert post("/nowhere", {})[0] == 404


@pytest.mark.slow  # starts `etpo serve` in a subprocess and loads the model there (several seconds)
def test_etpo_serve_command_serves_on_loopback(tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", "0", "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "etpo serve did not report its address"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "def build_model(X, y):"}],
             "max_tokens": 5}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.parametrize("name", ["zero-shot", "few-shot"])
def test_strategy_agents_are_registered_with_their_strategy_and_prompts(name):
    """zero-shot sends the env's prompt unchanged; few-shot puts demonstrations before it. Both stay configurable."""
    from agents import resolve_agent_class

    cls = resolve_agent_class(name)
    backend = RecordingBackend()
    agent = cls(backend=backend, seed=3)
    assert agent.config.strategy == name and agent.config.seed == 3
    env = ScriptedTextEnv(length=2)
    agent.learn(env, budget=2)
    if name == "zero-shot":
        assert backend.prompts == env.emitted[:2]  # no demonstrations, no reflections
    else:
        assert len(backend.prompts) == 2
        assert all(p.endswith(e) and len(p) > len(e) for p, e in zip(backend.prompts, env.emitted))
    assert cls(backend=backend, strategy="reflection").config.strategy == "reflection"  # still configurable


def test_learn_budget_counts_env_steps_over_the_agents_life():
    """`learn(env, budget)` means `budget` env steps in total, as for every learner: cumulative calls with budgets
    2 then 5 play 5 steps, and a repeated budget plays none."""
    backend = RecordingBackend()
    agent = PromptingAgent(backend=backend)
    env = ScriptedTextEnv(length=3)
    assert agent.learn(env, budget=2)["env_steps"] == 2
    assert agent.learn(env, budget=5)["env_steps"] == 3
    assert agent.learn(env, budget=5)["env_steps"] == 0
    assert len(backend.prompts) == 5 and agent.env_steps == 5


class BatchBackend(RecordingBackend):
    def __init__(self):
        super().__init__()
        self.batches: list[list[str]] = []

    def complete_batch(self, prompts: list[str]) -> list[str]:
        self.batches.append(list(prompts))
        return [f"\n    return {i}" for i in range(len(prompts))]


def test_prompting_acts_on_several_episodes_in_one_batched_call_except_with_reflection():
    from agents.benchmark.episodes import batch_actor
    from agents.prompting import PromptingAgent, ZeroShotPromptingAgent

    backend = BatchBackend()
    agent = ZeroShotPromptingAgent(backend=backend)
    assert batch_actor(agent) is not None
    assert agent.act_batch(["obs a", "obs b", "obs c"], [{}, {}, {}]) == [f"\n    return {i}" for i in range(3)]
    assert backend.batches == [["obs a", "obs b", "obs c"]] and backend.prompts == []  # one call, the prompts as is
    few = PromptingAgent(backend=backend, strategy="few-shot", k_shots=1)
    few.act_batch(["obs d"], [{}])
    assert backend.batches[-1][0].endswith("obs d") and backend.batches[-1][0] != "obs d"  # a shot before it
    plain = RecordingBackend()  # a backend with `complete` only is called once per prompt
    assert ZeroShotPromptingAgent(backend=plain).act_batch(["x", "y"], [{}, {}]) == [plain.answer] * 2
    assert plain.prompts == ["x", "y"]
    reflective = PromptingAgent(backend=backend, strategy="reflection")
    assert reflective.act_batch is None and batch_actor(reflective) is None  # its history is one episode's
