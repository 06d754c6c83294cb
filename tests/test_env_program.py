"""Action handling, text spaces and prompts of DataSciCode-v0 (no sandbox needed)."""

from __future__ import annotations

import ast
import re

import pytest

from etpo_env import prompts
from etpo_env.program import ENTRY_POINT, check_action, extract_program
from etpo_env.spaces import (
    MAX_ACTION_CHARS,
    REPLACEMENT_CHAR,
    code_charset,
    code_text_space,
    cut_middle,
    sanitize,
)

BODY = "from sklearn.linear_model import LogisticRegression\nreturn LogisticRegression().fit(X, y)"
FUNCTION = (
    "import numpy as np\n\n"
    "def helper():\n    return 1\n\n"
    "def build_model(X, y):\n"
    "    from sklearn.linear_model import LogisticRegression\n"
    "    return LogisticRegression().fit(X, y)\n"
)


def _function_body(program: str) -> list[str]:
    """Source lines of build_model's body, for comparing programs by what they do."""
    tree = ast.parse(program)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == ENTRY_POINT)
    return [ast.unparse(statement) for statement in function.body]


def test_entry_point_matches_tasks():
    from tasks.programs import ENTRY_POINT as TASKS_ENTRY_POINT

    assert ENTRY_POINT == TASKS_ENTRY_POINT


@pytest.mark.parametrize(
    "action",
    [
        BODY,
        "    " + BODY.replace("\n", "\n    "),  # indented body
        BODY.replace("\n", "\n    "),  # continuation of a prompt ending in the header: first line unindented
        f"```python\n{BODY}\n```",
        f"Here is my solution:\n\n```py\n{BODY}\n```\nIt uses logistic regression.",
        f"```\n{BODY}\n```",
        f"~~~python\n{BODY}\n~~~",
        f"```python\n{BODY}",  # unclosed fence: a generation cut off by its token limit
        BODY.replace("\n", "\r\n"),  # Windows newlines
    ],
)
def test_body_forms_extract_to_the_same_function(action):
    program = extract_program(action)
    assert program.startswith(f"def {ENTRY_POINT}(X, y):")
    assert _function_body(program) == [
        "from sklearn.linear_model import LogisticRegression",
        "return LogisticRegression().fit(X, y)",
    ]


@pytest.mark.parametrize(
    "action",
    [
        FUNCTION,
        f"```python\n{FUNCTION}```",
        f"Sure! The code:\n```python\n{FUNCTION}```\n\nAnd a usage example:\n```python\nmodel = build_model(X, y)\n```",
        f"```bash\npip install scikit-learn\n```\n```python\n{FUNCTION}```",
        "Sure, here it is.\n" + FUNCTION,  # prose before an unfenced program is dropped
    ],
)
def test_whole_programs_are_kept_with_imports_and_helpers(action):
    program = extract_program(action)
    assert ast.parse(program)
    assert "import numpy as np" in program and "def helper():" in program
    assert _function_body(program)[-1] == "return LogisticRegression().fit(X, y)"


def test_unparseable_code_is_passed_through_for_the_sandbox_to_report():
    program = extract_program("return (((")
    assert program.startswith(f"def {ENTRY_POINT}(X, y):") and "return (((" in program


@pytest.mark.parametrize("error", [SystemError("AST constructor recursion depth mismatch (before=54, after=50)"),
                                   RecursionError("maximum recursion depth exceeded during ast construction"),
                                   MemoryError()])
def test_a_parser_that_fails_on_agent_code_leaves_it_for_the_sandbox(monkeypatch, error):
    """CPython 3.11's parser raised SystemError on a program a learner sampled (learnability run, ETPO on titanic):
    the env step crashed and the run was lost. Any failure of the host's parser means "does not parse here": the
    program goes to the sandbox as is, which reports the error as a failed step."""

    def failing_parse(*args, **kwargs):
        raise error

    with monkeypatch.context() as patched:  # only around the call: pytest itself parses with ast
        patched.setattr(ast, "parse", failing_parse)
        program = extract_program("x = 1\nreturn x")
    assert program.startswith(f"def {ENTRY_POINT}(X, y):") and "return x" in program


def test_extracting_agent_code_prints_no_python_warnings():
    """Agent code such as `x = 1if y else 2` or `"\\d"` makes the host's parser warn (SyntaxWarning): the console of
    a learner that samples thousands of programs stays clean, and the warning cannot escalate under `-W error`."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = extract_program('    x = 1if True else 2\n    return "\\d"\n')
    assert "1if True" in program
    assert [str(w.message) for w in caught] == []


def test_fenced_program_holding_backticks_in_a_string():
    code = 'def build_model(X, y):\n    doc = "``"\n    return None\n'
    assert extract_program(f"````python\n{code}````") == code


@pytest.mark.parametrize("action", [1, None, b"return 1", ["return 1"], 3.5])
def test_non_str_actions_raise_type_error(action):
    with pytest.raises(TypeError, match="must be str"):
        check_action(action)


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("", "empty"),
        ("  \n\t\n", "empty"),
        ("return 1\x00", "U\\+0000"),
        ("x = 1\x1b[31m", "U\\+001B"),
        ("x = '\udc80'", "U\\+DC80"),  # a lone surrogate cannot even be encoded for the sandbox
        ("x" * (MAX_ACTION_CHARS + 1), "limit"),
    ],
)
def test_empty_binary_and_oversized_actions_are_refused(action, reason):
    problem = check_action(action)
    assert problem is not None
    assert re.search(reason, problem)


@pytest.mark.parametrize("action", [BODY, "x = '日本語 ✓ 🚀'\nreturn x", "a\tb\r\nc\x0c", "x" * MAX_ACTION_CHARS])
def test_ordinary_code_is_accepted(action):
    assert check_action(action) is None


def test_charset_covers_code_tracebacks_and_unicode_but_not_controls():
    charset = code_charset()
    for char in "\t\n {}[]()<>:;'\"`~!@#$%^&*-+=|\\/?.,_" + "éß日本🚀✓" + REPLACEMENT_CHAR:
        assert char in charset, repr(char)
    for char in "\x00\r\x1b\x7f\x85\ud800":
        assert char not in charset, repr(char)


def test_spaces_accept_code_and_cap_length():
    space = code_text_space(10)
    assert space.contains("def f():\n\treturn 1"[:10])
    assert not space.contains("x" * 11)
    assert not space.contains("a\x00")
    assert code_text_space(5).max_length == 5 and space.max_length == 10  # copies do not share max_length


def test_sanitize_maps_any_text_into_the_space():
    space = code_text_space(80)
    text = "line\r\nnext\rlast\x00\x1b" + "z" * 200
    clean = sanitize(text, 80)
    assert space.contains(clean)
    assert clean.startswith("line\nnext\nlast" + REPLACEMENT_CHAR * 2)
    assert clean.endswith("zzz")


@pytest.mark.parametrize("max_length", [1, 5, 40, 41, 100, 999])
def test_cut_middle_keeps_head_and_tail_within_the_limit(max_length):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    cut = cut_middle(text, max_length)
    assert len(cut) <= max_length
    if max_length >= 40:
        assert cut[:5] == text[:5] and cut[-5:] == text[-5:]
        marker = re.search(r"\n\.\.\. \[(\d+) characters cut\] \.\.\.\n", cut)
        kept = len(cut) - len(marker.group())
        assert int(marker.group(1)) == len(text) - kept  # the marker counts exactly what was removed
    assert cut_middle("short", 10) == "short"


class _StubTask:
    """Just what the prompts read from a task."""

    name = "stub"
    n_classes = 3
    input_format = "pandas"

    def describe(self, style):
        return {"paper": "Classification task with 4 features and 3 classes.", "rich": "Features: a, b"}[style]


def test_paper_prompt_shape():
    prompt = prompts.initial_prompt(_StubTask(), "paper")
    lines = prompt.splitlines()
    assert lines[0].startswith("You are a data scientist.") and "3-class classification" in lines[0]
    assert lines[1] == "Classification task with 4 features and 3 classes."  # shape only, no column names
    assert "ROC AUC" in prompt and "predict_proba" in prompt
    assert lines[-1] == "def build_model(X, y):"  # a completion model continues with the body
    assert "Features" not in prompt


def test_fix_prompt_carries_error_traceback_and_failing_code():
    info = {"status": "runtime_error", "error_type": "KeyError", "message": "KeyError: 'age'",
            "traceback": "\n".join(f"frame {i}" for i in range(40))}
    prompt = prompts.fix_prompt(_StubTask(), "rich", "def build_model(X, y):\n    return X['age']\n", info, 2)
    assert "Features: a, b" in prompt
    assert "KeyError: KeyError: 'age'" in prompt
    assert "frame 39" in prompt and "frame 10" not in prompt  # the traceback tail
    assert "```python\ndef build_model(X, y):\n    return X['age']\n```" in prompt
    assert "Fix the error" in prompt and "2 attempts left" in prompt


def test_refine_prompt_carries_scores_and_best_program():
    ok = {"status": "ok", "score": 0.91234}
    prompt = prompts.refine_prompt(_StubTask(), "paper", "def build_model(X, y):\n    pass\n", 0.95, ok, 1)
    assert "scored ROC AUC 0.9123" in prompt and "best program so far scored ROC AUC 0.9500" in prompt
    assert "Improve it" in prompt and "1 attempt left" in prompt
    failed = {"status": "timeout", "error_type": None, "message": "the program ran out of time", "traceback": ""}
    prompt = prompts.refine_prompt(_StubTask(), "paper", "def build_model(X, y):\n    pass\n", 0.95, failed, 1)
    assert "Your last program failed.\ntimeout: the program ran out of time" in prompt


def test_messages_wrap_the_observation():
    messages = prompts.as_messages("the prompt")
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == "the prompt"


def test_unknown_prompt_style_is_rejected():
    with pytest.raises(ValueError, match="prompt_style"):
        prompts.initial_prompt(_StubTask(), "fancy")
