"""ETPOAgent on the tiny LM: the LM path computes the same quantities as unchunked logits, an update moves the right
parameters, the buffer stays small, learning runs through the shared collector, and resuming from a checkpoint
reproduces the uninterrupted run's next update exactly."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agents.etpo import (
    ETPOAgent,
    ETPOConfig,
    Lion,
    LMHeadCritic,
    gathered_rows,
    pack,
    policy_loss_per_state,
    soft_value,
    state_values,
    token_kl,
)
from agents.lm import GenerationSettings

SMALL = dict(device="cpu", num_envs=1, max_new_tokens=10, lora_r=4, lora_alpha=8, minibatch_size=2, epochs=2, rollout_steps=4,
             seed=0, chunk_size=7)

# Training, export and the memory/GPU benches print no library deprecation warnings (a clean console).
pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.filterwarnings("error::FutureWarning")]


class DigitEnv(gym.Env):
    """One-step episodes: the reward is the share of digits in the action (deterministic, no sandbox)."""

    observation_space = gym.spaces.Text(max_length=200)
    action_space = gym.spaces.Text(max_length=2000)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "def build_model(X, y):\n", {}

    def step(self, action):
        reward = sum(c.isdigit() for c in action) / max(len(action), 1)
        return "done", float(reward), True, False, {"status": "ok"}

    def spawn(self):
        """A sibling for batched collection (`etpo_env.vector.vectorize`)."""
        return DigitEnv()


class TwoStepEnv(DigitEnv):
    """Two steps per episode (checks chains across env steps: next_index, bootstrap)."""

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return super().reset(seed=seed)

    def step(self, action):
        self.t += 1
        obs, reward, _, _, info = super().step(action)
        return f"attempt {self.t}: reward {reward:.2f}\n", reward, self.t >= 2, False, info




def snapshot(agent: ETPOAgent) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p.detach().clone() for n, p in agent.policy.model.named_parameters()
           if ".policy." in n or ".critic." in n}
    out.update({f"q_head.{n}": p.detach().clone() for n, p in agent.models.critic.named_parameters()})
    out.update({f"target.{i}": t.clone() for i, t in enumerate(agent.models.target)})
    return out


@pytest.fixture(scope="module")
def fresh_agent(tiny_model_dir):
    return ETPOAgent(model=tiny_model_dir, **SMALL)


def sample_sequences(agent, n=3):
    from agents.lm import GenerationSettings

    prompts = [agent.policy.encode(p) for p in ["def build_model(X, y):\n", "import numpy", "x = 1\n"]][:n]
    gens = agent.policy.generate(prompts, GenerationSettings(max_new_tokens=6, seed=3))
    return [(np.asarray(p), np.asarray(g.action_ids)) for p, g in zip(prompts, gens, strict=True)]


def test_starts_at_reference_with_zero_q_and_target_equal_to_critic(fresh_agent):
    agent = fresh_agent
    packed = pack(sample_sequences(agent), agent.policy.pad_id, "cpu")
    with torch.no_grad():
        rows = {role: agent.models.hidden(role, packed.input_ids, packed.attention_mask)[packed.row_batch,
                                                                                         packed.row_pos]
                for role in ("policy", "reference", "critic", "target")}
        pi, rho = agent.models.head("policy", rows["policy"]), agent.models.head("reference", rows["reference"])
        q, q_target = agent.models.head("critic", rows["critic"]), agent.models.head("target", rows["target"])
    torch.testing.assert_close(pi, rho)  # LoRA B starts at zero: π = ρ
    assert torch.count_nonzero(q) == 0 and torch.equal(q, q_target)
    assert pi.shape[-1] == agent.policy.hf_model.get_output_embeddings().weight.shape[0]


def test_chunked_lm_values_equal_unchunked_logits(tiny_model_dir):
    """V(u) through hidden rows + chunked heads == soft_value on the model's full [B, T, V] logits."""
    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    with torch.no_grad():  # move every part away from its start so the check is not trivial
        for p in agent.models.policy_parameters() + agent.models.critic_parameters():
            p.add_(0.05 * torch.randn_like(p))
        for t in agent.models.target:
            t.add_(0.05 * torch.randn_like(t))
    seqs = sample_sequences(agent)
    packed = pack(seqs, agent.policy.pad_id, "cpu")
    chunked, chunked_kl = state_values(agent.models, packed, beta=0.3, chunk_size=2)

    with torch.no_grad():
        ids, mask = packed.input_ids, packed.attention_mask
        pi = agent.policy.logits(ids, mask, "policy")[packed.row_batch, packed.row_pos]
        rho = agent.policy.logits(ids, mask, None)[packed.row_batch, packed.row_pos]
        agent.models._swap_target()  # target critic = EMA tensors in the critic's slots
        try:
            hidden = agent.policy.hidden_states(ids, mask, "critic")[packed.row_batch, packed.row_pos]
            q_target = agent.models.head("critic", hidden)  # the critic's slots hold the target here
        finally:
            agent.models._swap_target()
    torch.testing.assert_close(chunked, soft_value(pi, rho, q_target, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_kl, token_kl(pi, rho), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pi, rho)


def test_learn_moves_policy_critic_and_target_and_keeps_buffer_small(tiny_model_dir, tmp_path):
    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    before = snapshot(agent)
    seen = []
    summary = agent.learn(TwoStepEnv(), budget=8, callbacks=seen.append, out_dir=tmp_path / "run")
    after = snapshot(agent)
    assert len(seen) == 2 and summary["env_steps"] == 8 and summary["updates"] == 2
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".policy." in k for k in changed), "policy adapter did not move"
    assert any(".critic." in k for k in changed), "critic adapter did not move"
    assert {"q_head.value.weight", "q_head.up.weight"} <= changed and any(k.startswith("target.") for k in changed)
    # The target moved less than the critic (EMA with rate 0.05).
    for i, (p, t) in enumerate(zip(agent.models.critic_parameters(), agent.models.target, strict=True)):
        start = before[f"target.{i}"]
        assert (t - start).norm() <= (p.detach() - start).norm() + 1e-12
    stats = seen[-1]
    for key in ("reward_mean", "success_rate", "best_reward", "kl", "entropy", "q/taken_mean", "targets/mean",
                "loss/policy", "loss/critic", "grad_norm/policy", "grad_norm/critic", "tokens_per_s",
                "env_steps_per_s", "time_update_s", "time_generation_s", "peak_memory_mb"):
        assert np.isfinite(stats[key]), key
    assert "q_return_corr" in stats
    assert stats["targets/unbootstrapped"] == 0  # chains cut by collection bootstrap from next_obs_ids
    assert stats["buffer_bytes_per_token"] <= 64
    assert (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / "checkpoint" / "trainer.pt").exists()
    assert isinstance(agent.act("def build_model(X, y):\n", {}), str)


def test_resume_reproduces_the_uninterrupted_next_update(tiny_model_dir, tmp_path):
    straight = ETPOAgent(model=tiny_model_dir, **SMALL)
    straight.learn(DigitEnv(), budget=4)
    straight.save(tmp_path / "ckpt")
    straight.learn(DigitEnv(), budget=8)

    resumed = ETPOAgent.load(tmp_path / "ckpt")
    assert resumed.counters["env_steps"] == 4 and resumed.config == straight.config
    resumed.learn(DigitEnv(), budget=8)
    a, b = snapshot(straight), snapshot(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.counters == straight.counters


def test_lm_head_critic_and_lion_update(tiny_model_dir):
    agent = ETPOAgent(model=tiny_model_dir, critic="lm_head", optimizer="lion", policy_lr=1e-4, critic_lr=1e-4,
                      **SMALL)
    assert isinstance(agent.models.critic, LMHeadCritic) and not list(agent.models.critic.parameters())
    assert isinstance(agent.policy_opt, Lion)
    before = [p.detach().clone() for p in agent.models.critic_parameters()]
    stats = agent.learn(DigitEnv(), budget=4)
    assert np.isfinite(stats["loss/critic"]) and np.isfinite(stats["loss/policy"])
    assert any(not torch.equal(b, p) for b, p in zip(before, agent.models.critic_parameters(), strict=True))


def test_lion_steps_match_hand_computation():
    """Lion: x ← x·(1 − lr·wd) − lr·sign(β1·m + (1 − β1)·g); then m ← β2·m + (1 − β2)·g."""
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([x], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    x.grad = torch.tensor([0.3, -0.2])
    opt.step()  # m = 0: sign(0.1·g) = (+, −); x = (1·0.95 − 0.1, −2·0.95 + 0.1); m = 0.01·g
    assert x.detach().tolist() == pytest.approx([0.85, -1.8])
    x.grad = torch.tensor([-0.001, -0.5])
    opt.step()  # c = 0.9·(0.003, −0.002) + 0.1·(−0.001, −0.5) = (0.0026, −0.0518): signs (+, −)
    assert x.detach().tolist() == pytest.approx([0.85 * 0.95 - 0.1, -1.8 * 0.95 + 0.1])


def test_config_validates():
    with pytest.raises(ValueError, match="beta"):
        ETPOConfig(beta=0)
    with pytest.raises(ValueError, match="critic"):
        ETPOConfig(critic="value")
    with pytest.raises(ValueError, match="optimizer"):
        ETPOConfig(optimizer="sgd")
    with pytest.raises(ValueError):
        ETPOConfig(epochs=0)


def test_policy_step_under_lm_matches_soft_optimum_direction(fresh_agent):
    """With Q = a bump on one token, one policy-loss gradient step raises that token's probability (LM path)."""
    agent = fresh_agent
    packed = pack(sample_sequences(agent, n=1), agent.policy.pad_id, "cpu")
    h = agent.models.hidden("policy", packed.input_ids, packed.attention_mask)[packed.row_batch, packed.row_pos]
    logits = agent.models.head("policy", h)
    bump = torch.zeros_like(logits)
    bump[:, 5] = 1.0
    grad = torch.autograd.grad(policy_loss_per_state(logits, logits.detach(), bump, 0.1).sum(), logits)[0]
    assert (grad[:, 5] < 0).all()  # descending the loss raises logit 5
    assert F.softmax(logits, -1).shape == logits.shape


@pytest.mark.slow
def test_etpo_runs_end_to_end_on_a_bundled_task(tiny_model_dir, local_sandbox, tmp_path):
    """DataSciCode-v0 on breast_cancer with the local sandbox: programs are sampled, run, scored and learnt from."""
    import etpo_env  # noqa: F401  (registers DataSciCode-v0)

    env = gym.make("DataSciCode-v0", task="breast_cancer", sandbox=local_sandbox, max_attempts=2, max_rows=300)
    agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "max_new_tokens": 24, "rollout_steps": 3})
    try:
        summary = agent.learn(env, budget=3, out_dir=tmp_path / "run")
    finally:
        env.close()
    assert summary["env_steps"] == 3 and summary["updates"] == 1
    assert np.isfinite(summary["loss/critic"]) and np.isfinite(summary["reward_mean"])
    assert summary["time_sandbox_s"] > 0
    reloaded = ETPOAgent.load(tmp_path / "run" / "checkpoint")
    assert reloaded.counters == agent.counters


def test_overlapped_collection_trains_on_the_sandboxed_env_within_the_exact_budget(tiny_model_dir, local_sandbox):
    """`overlap_generation="on"` on DataSciCode-v0: half the envs generate while the other half's programs run on
    the shared sandbox; every step is counted once and the update runs on exactly the budgeted steps."""
    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from etpo_env.wrappers import EnvStepBudget

    env = EnvStepBudget(gym.make("DataSciCode-v0", task="breast_cancer", sandbox=local_sandbox, max_attempts=2,
                                 max_rows=300), budget=6)
    agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "rollout_steps": 6, "num_envs": 4},
                      overlap_generation="on")
    try:
        assert agent.config.runtime.overlap_generation == "on"
        summary = agent.learn(env, budget=6)
        assert agent.collector_for(env).overlap
    finally:
        env.close()
    assert summary["env_steps"] == 6 and summary["updates"] == 1 and env.steps == 6 and len(env.statuses) == 6
    assert np.isfinite(summary["loss/critic"]) and summary["time_sandbox_s"] > 0


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_bench_rows_show_the_lean_buffer(capsys):
    bench = _bench_module("etpo_memory")
    assert bench.main(["--vocab", "512", "--new-tokens", "16", "--prompt-tokens", "4", "--actions", "2",
                       "--hidden", "16", "--repeats", "1"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("512 |"))
    ours, naive = (float(x) for x in row.split("|")[1].split()[:2])
    assert ours <= 64 and naive >= 3 * 4 * 512  # three float32 vocabulary vectors per token


def test_gpu_bench_runs_its_code_on_cpu_and_exits_cleanly_without_cuda(capsys):
    bench = _bench_module("etpo_gpu")
    assert bench.main(["--device", "cpu", "--shapes", "smoke", "--actions", "2", "--minibatch-size", "2",
                       "--new-tokens", "8", "--prompt-tokens", "4", "--repeats", "1"]) == 0
    assert "smoke" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert bench.main([]) == 0
        out = capsys.readouterr().out
        assert "no CUDA device" in out and "critic state" in out  # the meta-device count comes first


def test_gpu_bench_counts_the_critic_of_the_7b_152k_shape_on_the_meta_device_with_or_without_a_gpu(capsys):
    bench = _bench_module("etpo_gpu")
    assert bench.SHAPES["7b"]["vocab_size"] >= 150_000
    assert bench.main(["--shapes", "7b", "--critic-table", "only"]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["7b"])
    dueling, head, lm_head = (float(row[i]) for i in (1, 3, 5))
    assert dueling <= 1024 and row[2] == "ok"  # the default critic fits the 1 GiB budget
    assert head > 1024 and row[4] == "over"  # a V×H head would not (≈ 11 GB at 152k × 3584)
    assert 0 < lm_head <= 1024


def test_throughput_speed_up_is_the_ratio_of_the_medians_and_each_repeat_has_its_own():
    bench = _bench_module("train_throughput")
    base = [{"steps": 1.0}, {"steps": 3.0}, {"steps": 2.0}]
    new = [{"steps": 4.0}, {"steps": 9.0}, {"steps": 8.0}]
    assert bench.speed_up(base, new, "steps") == (4.0, [4.0, 3.0, 4.0])  # medians 8 / 2; 4/1, 9/3, 8/2
    assert bench.cpu_busy((10.0, 100.0), (16.0, 110.0)) == pytest.approx(0.6)  # 6 busy of 10 core-seconds
    assert np.isnan(bench.cpu_busy(None, (16.0, 110.0)))


def test_throughput_bench_interleaves_repeats_counts_every_step_and_ends_with_the_speed_up_line(
        tiny_model_dir, capsys):
    import re

    bench = _bench_module("train_throughput")
    assert bench.main(["--model", str(tiny_model_dir), "--budget", "2", "--num-envs", "2", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = [line for line in lines if re.match(r"(one env, unbatched|2 envs, batched) #[12] ", line)]
    assert len(runs) == 4
    for line in runs:
        steps, counted = line.split("#")[1].split()[1:3]
        assert float(steps) == int(counted) == 2  # the budget wrapper saw every step of every run
    assert lines[-2].startswith("per repeat: env_steps_per_s ")
    assert re.fullmatch(r"speed-up: env_steps_per_s \d+\.\d\dx, tokens_per_s \d+\.\d\dx", lines[-1])


def test_checkpoints_follow_their_schedule_and_the_latest_n_are_kept(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from agents.learner import CheckpointSettings, kept_checkpoints

    def written(out, **options) -> list[int]:
        agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "rollout_steps": 2, **options})
        writes, real = [], agent.save
        monkeypatch.setattr(agent, "save", lambda d, **kw: writes.append(agent.counters["updates"]) or real(d, **kw))
        agent.learn(DigitEnv(), 10, out_dir=out)  # five updates of two env steps
        return writes

    assert ETPOConfig().checkpoints == CheckpointSettings(checkpoint_every=0, checkpoint_minutes=30.0,
                                                          keep_checkpoints=1)
    assert written(tmp_path / "default") == [5]  # large-model defaults: by time (30 min), and at the end
    assert written(tmp_path / "timed", checkpoint_minutes=1e-9) == [1, 2, 3, 4, 5]
    out = tmp_path / "every-2"
    assert written(out, checkpoint_every=2, keep_checkpoints=3) == [2, 4, 5]
    assert [p.name for p in kept_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["updates"] == 5
    assert ETPOAgent.load(out / "checkpoint-4").counters["updates"] == 4  # a kept one is a whole checkpoint
    assert written(out, checkpoint_every=1, keep_checkpoints=2) == [1, 2, 3, 4, 5]  # a new run in the same dir
    assert [p.name for p in kept_checkpoints(out)] == ["checkpoint-4"]  # the older ones beyond the count: gone
    assert ETPOAgent.load(out / "checkpoint-4").counters["updates"] == 4  # this run's, not the previous run's
    with pytest.raises(ValueError, match="keep_checkpoints"):
        ETPOConfig(checkpoints=CheckpointSettings(keep_checkpoints=0))


def test_a_checkpoint_write_that_fails_leaves_the_latest_checkpoint_in_place(tiny_model_dir, tmp_path, monkeypatch):
    import agents.learner as learner_module

    agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "rollout_steps": 2}, checkpoint_every=1, keep_checkpoints=2)
    out = tmp_path / "run"
    agent.learn(DigitEnv(), 4, out_dir=out)  # checkpoint (2 updates) and checkpoint-1
    agent.counters["updates"] += 1

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(learner_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="no space"):
        agent.save_checkpoint(out)
    monkeypatch.undo()
    assert ETPOAgent.load(out / "checkpoint").counters["updates"] == 2  # still the latest, where resume looks
    assert ETPOAgent.load(out / "checkpoint-1").counters["updates"] == 1


def test_stop_strings_set_on_the_learner_config_end_every_collected_action(tiny_model_dir):
    agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "max_new_tokens": 40, "num_envs": 2}, stop=("\n",))
    assert agent.config.generation.stop == ("\n",)
    collector = agent.collector_for(DigitEnv())
    assert collector.gen.stop == ("\n",)
    buffer, _ = collector.collect(4)
    for transition in buffer:
        text = agent.policy.decode(list(transition.action_ids))
        assert "\n" not in agent.policy.decode(list(transition.action_ids[:-1]))  # nothing after the stop string
        assert "\n" in text or len(transition.action_ids) == 40  # ended by the stop string or by the length cap
    assert any("\n" in agent.policy.decode(list(t.action_ids)) for t in buffer)  # the stop string did occur


def test_exported_policy_is_the_trained_policy(tiny_model_dir, tmp_path):
    from agents.lm import LMPolicy

    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    with torch.no_grad():
        for p in agent.models.policy_parameters():
            p.add_(0.05 * torch.randn_like(p))
    exported = LMPolicy.from_pretrained(agent.export_policy(tmp_path / "pi"))
    ids = torch.tensor([agent.policy.encode("def build_model(X, y):\n")])
    with torch.no_grad():
        ours = agent.policy.logits(ids, adapter="policy")
        theirs = exported.logits(ids)
        base = agent.policy.logits(ids, adapter=None)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(theirs, base, atol=1e-4)


def test_a_callback_returning_false_stops_training_and_every_callback_sees_the_update(tiny_model_dir, tmp_path):
    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    seen = []
    summary = agent.learn(DigitEnv(), budget=12, callbacks=[lambda stats: False, seen.append], out_dir=tmp_path)
    assert summary["updates"] == 1 and summary["env_steps"] == 4 and len(seen) == 1
    assert ETPOAgent.load(tmp_path / "checkpoint").counters == agent.counters


class SpawnableTwoStepEnv(TwoStepEnv):
    """TwoStepEnv that can be rebuilt as a sibling; every instance's steps land in one shared list."""

    def __init__(self, steps: list | None = None):
        self.steps = [] if steps is None else steps

    def spawn(self):
        return SpawnableTwoStepEnv(self.steps)

    def step(self, action):
        self.steps.append(action)
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, "score": reward, "program": f"program {len(self.steps)}"}


def test_learn_on_one_budget_wrapped_env_collects_from_num_envs_at_once_within_the_exact_budget(tiny_model_dir,
                                                                                                monkeypatch):
    from etpo_env.wrappers import EnvStepBudget

    agent = ETPOAgent(model=tiny_model_dir, **{**SMALL, "num_envs": 3, "rollout_steps": 3})
    batches = []
    generate = agent.policy.generate
    monkeypatch.setattr(agent.policy, "generate", lambda prompts, *a, **k: batches.append(len(prompts)) or
                        generate(prompts, *a, **k))
    inner = SpawnableTwoStepEnv()
    env = EnvStepBudget(inner, budget=5)
    summary = agent.learn(env, budget=5)
    assert batches == [3, 2] and summary["updates"] == 2 and summary["env_steps"] == 5
    assert len(inner.steps) == 5 and env.steps == 5 and env.exhausted and len(env.statuses) == 5
    first_best = env.dev_scores.index(max(env.dev_scores))
    assert env.best_program == f"program {first_best + 1}" and env.final_program == "program 5"
    assert env.episodes == 3  # three envs began an episode; none was begun and left unplayed


def _peak_saved_bytes(step) -> int:
    """Peak bytes of tensors saved for backward that are alive at once while `step()` runs."""
    import weakref

    live = {"now": 0, "peak": 0}

    def release(n):
        live["now"] -= n

    class Saved:
        def __init__(self, tensor):
            self.tensor, n = tensor, tensor.numel() * tensor.element_size()
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(self, release, n)

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        step()
    return live["peak"]


def test_backward_one_network_at_a_time_gives_the_joint_gradients_at_a_lower_peak(tiny_model_dir):
    from agents.etpo import etpo_backward, etpo_losses

    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    packed = pack(sample_sequences(agent), agent.policy.pad_id, "cpu")
    targets = torch.linspace(-1.0, 1.0, len(packed.tokens))
    params = agent.models.policy_parameters() + agent.models.critic_parameters()

    def joint():
        policy, critic, _ = etpo_losses(agent.models, packed, targets, 0.1, SMALL["chunk_size"])
        (policy + critic).backward()

    def separate():
        etpo_backward(agent.models, packed, targets, 0.1, SMALL["chunk_size"])

    peaks, grads = {}, {}
    for name, step in (("joint", joint), ("separate", separate)):
        for p in params:
            p.grad = None
        peaks[name] = _peak_saved_bytes(step)
        grads[name] = [p.grad.clone() if p.grad is not None else None for p in params]
    assert sum(g is not None for g in grads["separate"]) > 0
    for a, b in zip(grads["joint"], grads["separate"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    assert peaks["separate"] < 0.8 * peaks["joint"], peaks


def test_a_sampling_temperature_tempers_pi_and_rho_and_leaves_the_critic(tiny_model_dir):
    plain = ETPOAgent(model=tiny_model_dir, **SMALL)
    hot = ETPOAgent(model=tiny_model_dir, **SMALL, temperature=0.5)
    packed = pack(sample_sequences(plain), plain.policy.pad_id, "cpu")
    with torch.no_grad():
        for role, hidden_role in (("policy", "policy"), ("reference", "reference"), ("critic", "critic")):
            h = plain.models.hidden(hidden_role, packed.input_ids, packed.attention_mask)[packed.row_batch,
                                                                                         packed.row_pos]
            scale = 0.5 if role in ("policy", "reference") else 1.0  # the sampled π = softmax(logits / T)
            torch.testing.assert_close(hot.models.head(role, h).float(), plain.models.head(role, h).float() / scale)
    for bad in (dict(temperature=0.0), dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(ValueError, match="ETPO"):
            ETPOConfig(generation=GenerationSettings(**bad))


def test_the_update_on_pairs_sharing_a_prompt_equals_the_whole_sequence_update(tiny_model_dir):
    """Siblings' first attempts share their prompt, which the LM then runs once per role (`LMPolicy.action_states`);
    losses, every diagnostic and both networks' gradients equal those of the whole sequences."""
    from agents.etpo import etpo_backward

    agent = ETPOAgent(model=tiny_model_dir, **SMALL)
    obs, action = sample_sequences(agent)[0]
    others = sample_sequences(agent)
    packed = pack([(obs, action), (obs, action[:3]), (obs, np.zeros(0, np.int32)), *others], agent.policy.pad_id,
                  "cpu")
    targets = torch.linspace(-1.0, 1.0, len(packed.tokens))
    params = agent.models.policy_parameters() + agent.models.critic_parameters()
    out = {}
    for shared in (True, False):
        if not shared:
            hidden = agent.models.hidden  # the whole-sequence path (`hidden` over the padded batch) instead
            agent.models.rows = lambda role, batch: gathered_rows(functools.partial(hidden, role), batch)  # noqa: B023
        for p in params:
            p.grad = None
        policy, critic, info = etpo_backward(agent.models, packed, targets, 0.1, SMALL["chunk_size"])
        out[shared] = (policy, critic, info, [p.grad.clone() for p in params if p.grad is not None])
    (pol_a, crit_a, info_a, grads_a), (pol_b, crit_b, info_b, grads_b) = out[True], out[False]
    assert pol_a == pytest.approx(pol_b, abs=1e-5) and crit_a == pytest.approx(crit_b, abs=1e-5)
    for key in info_a:
        torch.testing.assert_close(info_a[key], info_b[key], atol=1e-4, rtol=1e-4, msg=key)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def agent_with_a_moved_critic(model_dir, **config) -> ETPOAgent:
    """An ETPO agent whose critic is not zero everywhere, as it is at the start (so Q differs between tokens)."""
    agent = ETPOAgent(model=model_dir, **config, **SMALL)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in agent.models.critic_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return agent


def test_fixed_correction_residuals_read_the_critic_the_first_step_reads(tiny_model_dir):
    """correction_residual="update": the baseline Q_φ(u, w) taken once before an update (`taken_q_values`, in
    inference batches) is, token for token, the Q at the taken tokens the first optimiser step's policy pass reads."""
    from types import SimpleNamespace

    from agents.etpo.update import policy_pass, taken_q_values

    agent = agent_with_a_moved_critic(tiny_model_dir)
    sequences = sample_sequences(agent)
    transitions = [SimpleNamespace(obs_ids=obs, action_ids=action) for obs, action in sequences]
    fixed = torch.cat(taken_q_values(agent.models, transitions, 2, agent.policy.pad_id, 5, "cpu"))
    packed = pack(sequences, agent.policy.pad_id, "cpu")
    with torch.no_grad():
        h_q = agent.models.rows("critic", packed)
        _, info = policy_pass(agent.models, packed, h_q, torch.zeros(len(packed.tokens)), 0.1, 7)
    assert fixed.abs().max() > 1e-3
    torch.testing.assert_close(fixed, info["q_taken"], atol=1e-5, rtol=1e-5)


def test_the_target_pass_hands_the_centred_critic_pis_mean_embedding_and_every_pass_reads_it(tiny_model_dir):
    """advantage_centring="policy": the target pass returns, per transition and token state, π's mean output
    embedding Σ_w π(w|u)·E_w (in inference batches); with it the policy pass's E_π Q equals the critic's V at every
    state (π has not moved yet), and the fixed baseline `taken_q_values` reads the same Q as the policy pass."""
    from types import SimpleNamespace

    from agents.etpo import compute_targets
    from agents.etpo.update import policy_pass, taken_q_values

    agent = agent_with_a_moved_critic(tiny_model_dir, advantage_centring="policy")
    assert agent.models.critic.centred
    sequences = sample_sequences(agent)
    transitions = [SimpleNamespace(obs_ids=obs, action_ids=action, reward=1.0, terminated=True, next_index=None)
                   for obs, action in sequences]
    summaries: list[torch.Tensor] = []
    compute_targets(agent.models, transitions, 0.1, 0.9, 5, 2, agent.policy.pad_id, "cpu", lam=1.0,
                    summaries_out=summaries)
    assert [len(s) for s in summaries] == [len(a) for _, a in sequences]
    packed = pack(sequences, agent.policy.pad_id, "cpu")
    summary = torch.cat(summaries)
    with torch.no_grad():
        pi = F.softmax(agent.models.head("policy", agent.models.rows("policy", packed)).float(), -1)
        (embedding,) = agent.models.critic._readout
        torch.testing.assert_close(summary, pi @ embedding.float(), atol=1e-5, rtol=1e-4)
        h_q = agent.models.rows("critic", packed)
        value, _ = agent.models.critic.split(h_q, summary)
        _, info = policy_pass(agent.models, packed, h_q, torch.zeros(len(packed.tokens)), 0.1, 7, summary=summary)
        _, plain = policy_pass(agent.models, packed, h_q, torch.zeros(len(packed.tokens)), 0.1, 7)
    torch.testing.assert_close(info["q_expected"], value, atol=1e-5, rtol=1e-4)
    assert (plain["q_expected"] - value).abs().max() > 1e-3  # without the summary Q is not centred
    fixed = torch.cat(taken_q_values(agent.models, transitions, 2, agent.policy.pad_id, 5, "cpu", summaries))
    torch.testing.assert_close(fixed, info["q_taken"], atol=1e-5, rtol=1e-5)
