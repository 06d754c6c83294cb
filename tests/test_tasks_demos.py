"""Demonstration corpus: deterministic, distinct, diverse; valid bodies really score in the sandbox and buggy ones
fail with the expected status."""

from __future__ import annotations

import ast
import collections
import random
import textwrap

import numpy as np
import pandas as pd
import pytest

import tasks
from sandbox import Status
from tasks import demos
from tasks.programs import wrap_body


@pytest.fixture(scope="module")
def corpus():
    return demos.corpus(n=2000, seed=0, buggy_fraction=0.2)


def test_corpus_is_deterministic_and_distinct(corpus):
    again = demos.corpus(n=2000, seed=0, buggy_fraction=0.2)
    assert [d.body for d in corpus] == [d.body for d in again]
    assert len({d.body for d in corpus}) == 2000
    other_seed = demos.corpus(n=2000, seed=1, buggy_fraction=0.2)
    assert [d.body for d in corpus] != [d.body for d in other_seed]


def test_thousands_of_distinct_valid_programs():
    assert len(demos.valid_recipes()) > 5000
    big = demos.corpus(n=6000, seed=0, buggy_fraction=0.1)
    assert len({d.body for d in big}) == 6000
    with pytest.raises(ValueError, match="at most"):
        demos.corpus(n=len(demos.valid_recipes()) + 10, buggy_fraction=0.0)


def test_corpus_mix(corpus):
    bugs = collections.Counter(d.bug for d in corpus)
    assert bugs[None] == 1600
    assert set(bugs) - {None} == set(demos.BUG_KINDS)
    assert min(bugs[k] for k in demos.BUG_KINDS) >= 400 // len(demos.BUG_KINDS)
    families = {d.family for d in corpus if d.bug is None}
    assert len(families) >= 10
    recipes = [d.recipe for d in corpus if d.bug is None]
    assert {r.imputer for r in recipes} == set(demos.NUMERIC_IMPUTERS)
    assert {r.categorical for r in recipes} == set(demos.CATEGORICAL_HANDLING)
    assert {r.scaler for r in recipes} == set(demos.SCALERS)


def test_programs_parse_unless_the_bug_is_a_syntax_error(corpus):
    for demo in corpus:
        assert demo.program.startswith("def build_model(X, y):\n")
        if demo.bug == "syntax_error":
            with pytest.raises(SyntaxError):
                ast.parse(demo.program)
        else:
            ast.parse(demo.program)


# --- demos really run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy_task(tmp_path_factory):
    """Numeric and categorical columns, missing values in both: the hardest input a valid demo must handle."""
    rng = np.random.RandomState(0)
    n = 160
    df = pd.DataFrame(
        {
            "age": rng.normal(40, 10, n),
            "income": rng.lognormal(10, 1, n),
            "city": rng.choice(["north", "south", "east"], n),
            "member": rng.randint(0, 2, n),
        }
    )
    df["label"] = np.where(df["age"] + 8 * df["member"] + rng.normal(0, 5, n) > 44, "yes", "no")
    df.loc[rng.rand(n) < 0.1, "age"] = np.nan
    df.loc[rng.rand(n) < 0.1, "city"] = np.nan
    path = tmp_path_factory.mktemp("demo") / "messy.csv"
    df.to_csv(path, index=False)
    return tasks.Task.from_csv(path, target="label")


def _one_per_family(corpus):
    chosen = {}
    for demo in corpus:
        if demo.bug is None and demo.family not in chosen:
            chosen[demo.family] = demo
    return list(chosen.values())


def test_valid_demos_score_in_the_sandbox(corpus, messy_task, local_sandbox):
    sample = _one_per_family(corpus)
    assert len(sample) >= 10
    scores = []
    for demo in sample:
        ev = tasks.evaluate(messy_task, demo.program, local_sandbox)
        assert ev.status is Status.OK, f"{demo.family}: {ev.result.message}\n{demo.body}"
        assert 0.0 <= ev.score <= 1.0 and len(ev.split_scores) == len(messy_task.dev_splits()), demo.family
        scores.append(ev.score)
    # A valid program may still be a poor one (e.g. an MLP on unscaled incomes), but most learn the signal.
    assert np.median(scores) > 0.7, scores


def test_buggy_demos_fail_with_the_expected_status(corpus, messy_task, local_sandbox):
    first = {}
    for demo in corpus:
        if demo.bug is not None and demo.bug not in first:
            first[demo.bug] = demo
    assert set(first) == set(demos.BUG_KINDS)
    for bug, demo in first.items():
        assert demo.fails_on(messy_task)
        ev = tasks.evaluate(messy_task, demo.program, local_sandbox)
        assert ev.status is Status(demo.expected_status(messy_task)), (
            f"{bug}: {ev.result.message}\n{demo.body}"
        )
        assert ev.status is not Status.OK
        assert ev.score is None and ev.result.message


def test_nan_intolerant_demo_runs_on_clean_data(corpus, local_sandbox):
    demo = next(d for d in corpus if d.bug == "nan_intolerant")
    clean = tasks.get("iris")
    assert not demo.fails_on(clean) and demo.expected_status(clean) == "ok"
    ev = tasks.evaluate(clean, demo.program, local_sandbox)
    assert ev.status is Status.OK, ev.result.message


# --- layouts ----------------------------------------------------------------------------------------------------


def _statements(body):
    """(imported (module, name) pairs, the other statements as AST dumps in order) of a body."""
    function = ast.parse("def build_model(X, y):\n" + textwrap.indent(body, "    ")).body[0]
    imported, others = set(), []
    for node in function.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((getattr(node, "module", None), alias.name) for alias in node.names)
        else:
            others.append(ast.dump(node))
    return imported, others


def test_local_layout_is_the_grouped_program_with_imports_moved_next_to_their_use():
    for demo in demos.corpus(n=300, seed=3, buggy_fraction=0.0):
        grouped, local = demos.render(demo.recipe), demos.render(demo.recipe, layout="local")
        assert grouped == demo.body and local != grouped
        (g_imports, g_others), (l_imports, l_others) = _statements(grouped), _statements(local)
        assert g_imports == l_imports
        # the same statements in the same order, but for the classifier line, which comes first
        classifier = next(s for s in g_others if "id='classifier', ctx=Store()" in s)
        assert l_others == [classifier] + [s for s in g_others if s != classifier]
        family = demos.FAMILIES_BY_NAME[demo.recipe.family]
        lines = local.splitlines()
        assert lines[0] == f"from {family.module} import {family.cls}"
        assert lines[1].startswith(f"classifier = {family.cls}(")
        # every name that differs between programs is imported on the lines right above its first use
        varying = {family.cls, *demos._numeric_steps(demo.recipe)[1], *demos._categorical_steps(demo.recipe)[1]}
        for name in varying:
            at = next(i for i, line in enumerate(lines) if line.startswith("from ") and f" {name}" in line)
            use = next(i for i, line in enumerate(lines) if f"{name}(" in line and not line.startswith("from "))
            assert at < use and all(line.startswith(("from ", "import ")) for line in lines[at:use]), (name, local)


def test_layout_keeps_the_corpus_draw_and_the_bugs():
    grouped = demos.corpus(n=140, seed=0, buggy_fraction=0.2)
    local = demos.corpus(n=140, seed=0, buggy_fraction=0.2, layout="local")
    assert [(d.recipe, d.family, d.bug) for d in grouped] == [(d.recipe, d.family, d.bug) for d in local]
    for g, d in zip(grouped, local):
        if d.bug == "syntax_error":
            with pytest.raises(SyntaxError):
                ast.parse(d.program)
        else:
            assert _statements(g.body)[0] == _statements(d.body)[0]  # the same imports (a wrong one included)
    with pytest.raises(ValueError, match="layout"):
        demos.render(grouped[0].recipe, layout="sideways")


def test_local_layout_demos_and_their_buggy_variants_run_as_expected(corpus, messy_task, local_sandbox):
    rng = random.Random(0)
    for demo in _one_per_family(corpus):
        program = wrap_body(demos.render(demo.recipe, layout="local"))
        ev = tasks.evaluate(messy_task, program, local_sandbox)
        assert ev.status is Status.OK, f"{demo.family}: {ev.result.message}\n{program}"
    for bug in demos.BUG_KINDS:
        buggy = demos.buggy_demo(corpus[0].recipe, bug, rng, layout="local")
        ev = tasks.evaluate(messy_task, buggy.program, local_sandbox)
        assert ev.status is Status(buggy.expected_status(messy_task)), f"{bug}: {ev.result.message}"
