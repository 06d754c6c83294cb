"""Turn an agent's action text into the program the sandbox runs.

An action may be the body of `build_model`, a whole program defining `build_model` (imports and helpers
included), or either of these inside a Markdown code fence with prose around it. `check_action` finds actions
that must not be run at all (empty, binary, oversized); `extract_program` does the rest and never raises.
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings

from etpo_env.spaces import MAX_ACTION_CHARS

ENTRY_POINT = "build_model"  # the same name as tasks.programs.ENTRY_POINT; tests check they agree

# Characters that never occur in source text: C0 controls except tab/newline/carriage return/form feed, DEL,
# C1 controls, and lone surrogates (which cannot even be encoded to UTF-8 for the sandbox).
_BINARY = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# A fence opens with 3+ backticks or tildes and an optional language tag; an unclosed fence runs to the end
# (a generation cut off by its token limit).
_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)[^\n]*\n(?P<code>.*?)(?:^[ \t]*(?P=fence)[ \t]*$|\Z)",
    re.MULTILINE | re.DOTALL,
)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_DEFINES_ENTRY = re.compile(rf"^def[ \t]+{ENTRY_POINT}[ \t]*\(", re.MULTILINE)
_CODE_START = re.compile(r"^(?:import |from |def |class |@|#)", re.MULTILINE)


def check_action(action: object, max_chars: int = MAX_ACTION_CHARS) -> str | None:
    """Return why `action` cannot be run (empty, binary, oversized), or None if it can.

    Raises TypeError for anything that is not a `str`: that is a bug in the caller, not an agent's mistake.
    """
    if not isinstance(action, str):
        raise TypeError(
            f"DataSciCode-v0 actions must be str (program text), got {type(action).__name__}; "
            "decode token ids to text before calling step()"
        )
    if len(action) > max_chars:
        return f"The action has {len(action)} characters, more than the limit of {max_chars}; it was not run."
    if not action.strip():
        return "The action is empty; reply with Python code that defines build_model(X, y)."
    binary = _BINARY.search(action)
    if binary:
        return (
            f"The action contains a non-text character (U+{ord(binary.group()):04X} at position {binary.start()}); "
            "it looks like binary data and was not run."
        )
    return None


def extract_program(action: str) -> str:
    """The full program text for `action`: fenced block, whole program, or function body (wrapped)."""
    code = _normalise_newlines(_pick_code(action))
    if _DEFINES_ENTRY.search(textwrap.dedent(code)):
        return _ensure_newline(_whole_program(textwrap.dedent(code)))
    return _ensure_newline(_wrap_first_parsing(_body_candidates(code)))


def _pick_code(action: str) -> str:
    """The code inside the best fenced block, or the whole action when there is no fence."""
    blocks = [(m.group("lang").lower(), m.group("code")) for m in _FENCE.finditer(action)]
    blocks = [(lang, code) for lang, code in blocks if code.strip()]
    if not blocks:
        return action
    for _lang, code in blocks:  # the block that defines the entry point wins
        if _DEFINES_ENTRY.search(textwrap.dedent(code)):
            return code
    for lang, code in blocks:
        if lang in _PYTHON_TAGS:
            return code
    return blocks[0][1]


def _whole_program(code: str) -> str:
    """`code` defines build_model; drop leading prose lines if that makes it parse."""
    if _parses(code):
        return code
    start = _CODE_START.search(code)
    if start and _parses(code[start.start() :]):
        return code[start.start() :]
    return code


def _body_candidates(code: str) -> list[str]:
    """Readings of a function body, most likely first.

    A completion model that continues a prompt ending in `def build_model(X, y):` often writes its first line
    without indentation and the rest indented, so the first line and the rest are also dedented separately.
    """
    code = code.strip("\n")
    candidates = [textwrap.dedent(code)]
    first, _, rest = code.partition("\n")
    if rest.strip():
        candidates.append(first.strip() + "\n" + textwrap.dedent(rest))
    return candidates


def _wrap_first_parsing(bodies: list[str]) -> str:
    from tasks.programs import wrap_body  # tasks owns the program template

    programs = [wrap_body(body) for body in bodies]
    return next((program for program in programs if _parses(program)), programs[0])


def _parses(code: str) -> bool:
    """Whether the host's parser accepts `code`. Any failure of the parser means no: deep nesting raises
    RecursionError or MemoryError, and CPython 3.11 can raise SystemError ("AST constructor recursion depth
    mismatch") on a program a learner sampled. The program then goes to the sandbox as is, which reports its error."""
    try:
        with warnings.catch_warnings():  # agent code's own SyntaxWarnings ("invalid decimal literal") are not ours
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError, SystemError):
        return False
    return True


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _ensure_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"
