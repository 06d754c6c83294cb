"""Types shared by every sandbox backend: what goes in (`Job`), what comes out (`RunResult`), and the limits.

Data crosses back from the sandbox as plain arrays and JSON only; nothing returned is ever unpickled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

# One marker for everything the sandbox creates: the label of every Docker container (see `etpo sandbox prune`) and
# the value of ETPO_SANDBOX inside either backend.
LABEL = "etpo-gym.sandbox"


class Status(str, enum.Enum):  # noqa: UP042 (StrEnum needs Python 3.11; 3.10 is supported)
    OK = "ok"
    SYNTAX_ERROR = "syntax_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY_EXCEEDED = "memory_exceeded"
    OUTPUT_EXCEEDED = "output_exceeded"
    KILLED_BY_SIGNAL = "killed_by_signal"
    INVALID_OUTPUT = "invalid_output"
    SANDBOX_ERROR = "sandbox_error"


@dataclass(frozen=True)
class Limits:
    """Per-job resource limits, enforced inside the isolation boundary (wall time from outside the child)."""

    wall_time_s: float = 60.0
    cpu_time_s: int = 60
    memory_mb: int = 2048  # address-space cap; scipy's import alone needs more than 256 MiB
    max_processes: int = 64
    max_file_size_mb: int = 16
    max_open_files: int = 256
    max_output_bytes: int = 32_768  # per stream; head and tail kept, truncation marked
    output_kill_bytes: int = 4 << 20  # stdout+stderr beyond this is a flood: the job is stopped (output_exceeded)
    tmpfs_mb: int = 256  # size of the private /tmp that holds the job's working directory


@dataclass
class Fold:
    """One fit/predict round: the program sees features and training labels, never the scored labels."""

    X_fit: Any  # pandas.DataFrame or np.ndarray
    y_fit: np.ndarray
    X_eval: Any  # same type as X_fit


@dataclass
class Job:
    """A program to run: `model = <entry_point>(X_fit, y_fit)`, then `model.<predict_method>(X_eval)` per fold."""

    program: str
    folds: list[Fold]
    entry_point: str = "build_model"
    predict_method: str = "predict_proba"


@dataclass
class RunResult:
    status: Status
    message: str = ""  # one paragraph an LLM can act on
    error_type: str | None = None  # e.g. "ValueError"
    traceback: str = ""  # trimmed to the agent's own lines
    stdout: str = ""
    stderr: str = ""
    predictions: list[np.ndarray] | None = None  # one float array per fold, validated on the host
    duration_s: float = 0.0
    peak_memory_mb: float = 0.0
    isolation: str = ""  # "docker", "local" or "unsafe-process"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@runtime_checkable
class Sandbox(Protocol):
    isolation: str

    def run(self, job: Job) -> RunResult: ...

    def close(self) -> None: ...

    def __enter__(self) -> Sandbox: ...

    def __exit__(self, *exc: object) -> None: ...
