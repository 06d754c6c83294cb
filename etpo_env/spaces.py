"""Text spaces for code and prompts.

Gymnasium's `Text` defaults to an alphanumeric charset, which rejects code (spaces, brackets, newlines) and
tracebacks. These spaces accept every printable Unicode character (`str.isprintable()`, all planes, so CJK and
emoji in comments are fine) plus tab and newline. Observations are passed through `sanitize` so they always lie
in the space (other control characters become U+FFFD, carriage returns become newlines, overlong text is cut in
the middle with a marker).
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Sequence

import numpy as np
from gymnasium.spaces import Text
from gymnasium.vector.utils import read_from_shared_memory

MAX_ACTION_CHARS = 20_000  # an action longer than this is a failed step (`invalid_action`), never run
MAX_OBSERVATION_CHARS = 65_536  # prompts are cut in the middle to fit (the failing code is the part that grows)
REPLACEMENT_CHAR = "\ufffd"
_CUT_MARKER = "\n... [{n} characters cut] ...\n"


@functools.cache
def code_charset() -> frozenset[str]:
    """Every printable character of every Unicode plane, plus tab and newline (about 145k characters)."""
    printable = (chr(code) for code in range(sys.maxunicode + 1) if chr(code).isprintable())
    return frozenset([*printable, "\t", "\n"])


class CodeText(Text):
    """`Text` over `code_charset()`; a subclass only so async vector envs can read it from shared memory.

    Gymnasium 1.4 reads a `Text` observation buffer once, when the vector env is built, so every later
    observation would read back as that first snapshot (empty strings of tab characters). `CodeText` registers
    a live view instead (see `_read_code_text`). Copies share the (immutable) character tables: Gymnasium's
    vector envs deep-copy a space per sub-env, and a full copy of the tables costs about a second each.
    """

    def __copy__(self) -> CodeText:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> CodeText:
        clone = self.__copy__()
        clone._np_random = copy.deepcopy(self._np_random, memo)
        return clone

    def __reduce__(self):
        # Rebuilt from the per-process cache instead of pickling ~145k characters (the generator is not kept).
        return code_text_space, (self.max_length,)


@functools.cache
def _base_space() -> CodeText:
    # Text builds a per-character index (about 1 s and 13 MB for this charset); copies share it.
    return CodeText(max_length=MAX_OBSERVATION_CHARS, min_length=0, charset=code_charset())


def code_text_space(max_length: int) -> CodeText:
    """A `Text` space over `code_charset()` holding 0..max_length characters; cheap after the first call."""
    space = copy.copy(_base_space())
    space.max_length = int(max_length)
    space._np_random = None  # each copy gets its own generator when seeded
    return space


def sanitize(text: str, max_length: int = MAX_OBSERVATION_CHARS) -> str:
    """Map `text` into the code space: normalise newlines, replace other control characters, cut the middle."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    charset = code_charset()
    if not all(char in charset for char in text):
        text = "".join(char if char in charset else REPLACEMENT_CHAR for char in text)
    return cut_middle(text, max_length)


def cut_middle(text: str, max_length: int) -> str:
    """Keep the head and tail of `text` so the result has at most `max_length` characters."""
    if len(text) <= max_length:
        return text
    cut = len(text) - max_length
    for _ in range(3):  # the marker's own length depends on the number it prints
        marker = _CUT_MARKER.format(n=cut)
        keep = max_length - len(marker)
        cut = len(text) - keep
    if keep < 2:
        return text[:max_length]
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head) :]


class SharedTextView(Sequence):
    """The observations of an async vector env's shared buffer, decoded when read.

    The vector env deep-copies its observations before returning them (its default `copy=True`), which turns
    this view into a tuple of str; with `copy=False` the caller gets the view itself, as for array buffers.
    """

    def __init__(self, space: Text, shared_memory, n: int):
        self._space = space
        self._rows = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape(n, space.max_length)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        row = self._rows[index]
        chars = self._space.character_list
        return "".join([chars[code] for code in row[row < len(chars)].tolist()])

    def __deepcopy__(self, memo) -> tuple[str, ...]:
        return tuple(self)


@read_from_shared_memory.register(CodeText)
def _read_code_text(space: CodeText, shared_memory, n: int = 1) -> SharedTextView:
    return SharedTextView(space, shared_memory, n)
