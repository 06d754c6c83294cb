"""The tiny code model: built from nothing, deterministic for a seed, cached, trained on the env's first, fix and
refine prompts followed by demos; evaluated on five-attempt episodes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from agents import tiny, tiny_evaluation
from agents.lm import GenerationSettings, LMPolicy


def test_tiny_model_builds_from_nothing_and_generates(tiny_model_dir):
    build = json.loads((tiny_model_dir / "build.json").read_text())
    assert build["final_loss"] < build["first_loss"]  # it trained
    assert (tiny_model_dir / "tokenizer.json").exists() and (tiny_model_dir / "config.json").exists()
    policy = LMPolicy.from_pretrained(tiny_model_dir)
    assert policy.tokenizer.eos_token == tiny.EOS and policy.tokenizer.pad_token == tiny.PAD
    out = policy.generate([policy.encode("def build_model(X, y):")], GenerationSettings(max_new_tokens=10, seed=0))
    assert len(out[0].action_ids) >= 1 and isinstance(out[0].text, str)


def test_build_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    tiny.build_tiny_model(tmp_path / "again", preset="test", seed=0)
    a = LMPolicy.from_pretrained(tiny_model_dir).model.state_dict()
    b = LMPolicy.from_pretrained(tmp_path / "again").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_ensure_tiny_model_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ETPO_CACHE", str(tmp_path))
    calls = []
    real = tiny.build_tiny_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_model", counting)
    first = tiny.ensure_tiny_model(preset="test")
    second = tiny.ensure_tiny_model(preset="test")
    assert first == second == tmp_path / "tiny" / "test-seed0" and len(calls) == 1
    assert not list(tmp_path.glob("tiny/*.building-*"))  # built aside, then renamed into place
    tiny.ensure_tiny_model(preset="test", rebuild=True)
    assert len(calls) == 2


def test_training_pairs_are_env_prompts_followed_by_corpus_programs():
    from etpo_env.program import extract_program

    pairs = tiny.training_pairs(n_demos=30, seed=0, buggy_fraction=0.0, max_tasks=2, weak_family_weight=3.0)
    assert len(pairs) == 30
    for prompt, completion in pairs:
        assert prompt.rstrip().endswith(tiny.HEADER)  # the env's prompt ends with the function header
        assert completion.startswith("\n    ")
        program = extract_program(completion)  # the env turns the continuation back into the program
        compile(program, "<demo>", "exec")
    # weak families are drawn more often than their share of the corpus
    from tasks import demos

    pool = demos.corpus(n=120, seed=0, buggy_fraction=0.0)
    share = sum(d.family in tiny.WEAK_FAMILIES for d in pool) / len(pool)
    drawn = tiny.training_pairs(n_demos=120, seed=1, buggy_fraction=0.0, max_tasks=1, weak_family_weight=3.0)
    weak_drawn = sum(any(f"from sklearn.{m}" in c for m in ("naive_bayes", "neighbors", "tree",
                                                            "discriminant_analysis")) or "SGDClassifier" in c
                     or "AdaBoost" in c for _, c in drawn) / len(drawn)
    assert weak_drawn > share


def test_demos_repeat_a_fixed_number_of_distinct_programs():
    pairs = tiny.training_pairs(n_demos=200, seed=0, buggy_fraction=0.0, max_tasks=1, distinct_programs=7)
    assert len(pairs) == 200 and len({c for _, c in pairs}) <= 7


def test_encode_pairs_masks_the_prompt_and_keeps_only_its_tail():
    class CharTokenizer:  # one id per character: lengths are easy to reason about
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in text]}

    prompt, completion = "p" * 50 + "HEAD", "body"
    (full,), (tail,) = (tiny.encode_pairs(CharTokenizer(), [(prompt, completion)], block=40, prompt_tail=k)
                        for k in (0, 6))
    for ids, labels in (full, tail):
        n_prompt = len(ids) - len(completion) - 1
        assert labels == [-100] * n_prompt + [ord(ch) for ch in completion] + [0]
        assert ids[n_prompt - 4:n_prompt] == [ord(ch) for ch in "HEAD"]  # the tail next to the completion is kept
    assert len(full[0]) == 40 and len(tail[0]) == 6 + len(completion) + 1


@pytest.mark.slow
def test_sample_report_runs_episodes_through_the_env(tiny_model_dir, local_sandbox):
    rows = tiny_evaluation.evaluate_samples(tiny_model_dir, ["iris"], n_samples=2, sandbox=local_sandbox, max_new_tokens=24,
                                 max_attempts=2)
    (row,) = rows
    assert row["task"] == "iris" and row["samples"] == 2
    assert 0.0 <= row["validity"] <= row["episode_success"] <= 1.0 and 0.0 < row["distinct"] <= 1.0
    # fix mode: an episode goes on only after a failed attempt, so attempts 2..N all follow a failure
    assert row["fix_attempts"] == round(2 * (1 - row["validity"]))
    assert row["fix_rate"] is None if row["fix_attempts"] == 0 else 0.0 <= row["fix_rate"] <= 1.0
    if row["episode_success"] == 0:  # the barely-trained test model mostly writes fragments: nothing to average
        assert row["mean_normalized_valid"] is None and row["mean_normalized_all"] == 0.0
    else:
        assert row["mean_normalized_valid"] is not None


@pytest.mark.slow
def test_evaluation_is_deterministic_for_a_seed(tiny_model_dir, local_sandbox):
    import tasks

    policy = LMPolicy.from_pretrained(tiny_model_dir)
    task_list = [tasks.get(name, max_rows=tiny.EVAL_MAX_ROWS) for name in ("iris", "wine")]

    def programs(seed):
        episodes = tiny_evaluation.sample_episodes(policy, task_list, local_sandbox, n_samples=2, seed=seed, max_new_tokens=16,
                                        max_attempts=2)
        assert len(episodes) == 4 and all(1 <= len(ep) <= 2 for ep in episodes)
        return [[a["program"] for a in ep] for ep in episodes]

    first = programs(0)
    assert programs(0) == first  # the same live policy again: its sampling does not continue an earlier stream
    assert programs(1) != first


def test_fix_program_keeps_the_family_and_writes_one_plain_rest():
    from tasks import demos
    from tasks.programs import wrap_body

    rests = set()
    for family in demos.FAMILIES:
        recipe = demos.safe_recipe(family.name)
        failing = demos.buggy_demo(recipe, "misspelt_class", random.Random(0), tiny.DEMO_LAYOUT)
        program = tiny.fix_program(failing)
        compile(program, "<fix>", "exec")
        assert program == wrap_body(demos.render(recipe, layout="local"))
        body = program.splitlines()[1:]
        # the family is decided on the first two lines (its import, then the classifier); the rest never varies
        assert body[0] == f"    from {family.module} import {family.cls}"
        assert body[1].startswith(f"    classifier = {family.cls}(")
        rests.add("\n".join(body[2:]))
    assert len(rests) == 1


def test_summary_line_is_the_exact_last_line():
    rows = [{"validity": 0.25, "fix_attempts": 6, "fixes": 3, "episode_success": 0.75, "distinct": 1.0,
             "mean_normalized_all": 0.5},
            {"validity": 0.5, "fix_attempts": 4, "fixes": 1, "episode_success": 0.5, "distinct": 1.0,
             "mean_normalized_all": 0.25}]
    assert tiny_evaluation.summary_line(rows) == "mean: first-attempt validity 0.38, fix rate 0.40, episode success 0.62"


def test_training_truncates_prompts_as_the_policy_does_at_inference():
    for name in ("default", "test-feedback"):
        spec = tiny.PRESETS[name]
        # trained on sequences as long as the context: no inference position lies outside the trained range
        assert spec.train_block == spec.context_length
        # the prompt tail kept in training is the one LMPolicy keeps for the default number of new tokens
        assert spec.prompt_tail_tokens == spec.context_length - tiny.GENERATION_TOKENS
        assert spec.prompt_tail_tokens == spec.context_length - GenerationSettings().max_new_tokens


@pytest.fixture(scope="module")
def feedback_build(tmp_path_factory, local_sandbox):
    """Two builds of the "test-feedback" preset with the same seed; the first runs the sandbox, the second reads
    the feedback cache."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETPO_CACHE", str(cache))
        a = tmp_path_factory.mktemp("feedback-a")
        b = tmp_path_factory.mktemp("feedback-b")
        tiny.build_tiny_model(a, preset="test-feedback", seed=0, sandbox=local_sandbox)
        tiny.build_tiny_model(b, preset="test-feedback", seed=0, sandbox=local_sandbox)
    return a, b, cache


@pytest.mark.slow
def test_build_with_feedback_pairs_is_byte_identical_for_a_seed(feedback_build):
    a, b, cache = feedback_build
    build = json.loads((a / "build.json").read_text())
    assert build["n_fix_pairs"] > 0 and build["n_refine_pairs"] > 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert len(list((cache / "tiny" / "feedback").glob("*.json"))) == 1  # run once, then cached
    assert LMPolicy.from_pretrained(a).context_length == tiny.PRESETS["test-feedback"].context_length


@pytest.mark.slow
def test_fix_and_refine_prompts_are_the_envs_own_text(local_sandbox, feedback_build, monkeypatch):
    import tasks
    from etpo_env import prompts
    from etpo_env.env import DataSciCodeEnv
    from etpo_env.program import extract_program

    monkeypatch.setenv("ETPO_CACHE", str(feedback_build[2]))
    spec = tiny.PRESETS["test-feedback"]
    fix, refine = tiny.feedback_pairs(spec, seed=0, sandbox=local_sandbox)  # from the cache
    assert len(fix) == round(spec.n_demos * spec.fix_fraction) and len(refine) == round(spec.n_demos *
                                                                                        spec.refine_fraction)
    for prompt, completion in fix:
        assert "Your previous code failed." in prompt and prompt.endswith(tiny.HEADER)
        failing = prompt.split("The failing code:\n```python\n", 1)[1].split("\n```", 1)[0]
        corrected = extract_program(completion)
        compile(corrected, "<fix>", "exec")
        assert corrected.strip() != failing.strip()  # the completion changes the failing code
    for prompt, completion in refine:
        assert "Your best program so far scored ROC AUC" in prompt and prompt.endswith(tiny.HEADER)
        best = prompt.split("so far scored ROC AUC ", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
        assert extract_program(completion).strip() != best.strip()  # refine answers with a different program

    # the cached feedback of a failing program is exactly what the env shows after running it
    task = tasks.get(tasks.names(suite="bundled")[0], max_rows=tiny.EVAL_MAX_ROWS)
    prompt = next(p for p, _ in fix if p.startswith(prompts.initial_prompt(task, "paper").rsplit("\n\n", 1)[0]))
    failing = prompt.split("The failing code:\n```python\n", 1)[1].split("\n```", 1)[0]
    (info,) = tiny.run_feedback([(task.name, failing + "\n")], {task.name: task}, local_sandbox)
    env = DataSciCodeEnv(task=task, sandbox=local_sandbox, max_attempts=5)
    env.reset(seed=0)
    obs, *_ = env.step(failing + "\n")
    assert info["status"] != "ok"
    assert obs == prompts.fix_prompt(task, "paper", failing + "\n", info, attempts_left=4)
    env.close()


def test_progress_prints_step_loss_and_eta_as_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    lines = []
    bar = tiny._Progress(40, lines.append, enabled=True)
    for step in range(40):
        bar.update(step, 1.0 / (step + 1))
    bar.close()
    assert lines[0].startswith("step 1/40  loss 1.000") and lines[-1].startswith("step 40/40  loss 0.025")
    assert all("ETA" in line for line in lines) and len(lines) == 21  # step 1, then every 5 %
    silent = []
    tiny._Progress(40, silent.append, enabled=False).update(0, 1.0)
    assert silent == []


def test_the_evaluation_table_fits_80_columns_without_cropping(capsys, monkeypatch):
    from rich.console import Console

    import tasks
    from agents.cli import _print_sample_table

    monkeypatch.setenv("COLUMNS", "80")
    rows = [{"task": name, "validity": 0.125, "fix_rate": 0.4375, "episode_success": 1.0, "distinct": 0.875,
             "mean_normalized_valid": 0.9938, "mean_normalized_all": 0.9938, "fixes": 7, "fix_attempts": 16}
            for name in tasks.names(suite="bundled")]
    _print_sample_table(Console(), rows)
    lines = capsys.readouterr().out.splitlines()
    assert "…" not in "\n".join(lines) and max(len(line) for line in lines) <= 80
    for name in tasks.names(suite="bundled"):
        assert any(line.split() and line.split()[0] == name for line in lines), name
    assert any(line.split()[:2] == ["mean", "0.12"] for line in lines if line.strip())
