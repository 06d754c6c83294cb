"""The program an agent writes: a `build_model(X, y)` function returning a fitted model with `predict_proba`."""

from __future__ import annotations

import textwrap

ENTRY_POINT = "build_model"
SIGNATURE = f"def {ENTRY_POINT}(X, y):"


def wrap_body(body: str) -> str:
    """Full program text: `def build_model(X, y):` followed by `body` indented one level (4 spaces)."""
    body = textwrap.dedent(body).strip("\n")
    if not body.strip():
        body = "pass"
    return SIGNATURE + "\n" + textwrap.indent(body, "    ") + "\n"
