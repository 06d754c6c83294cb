"""Run logging shared by every learner: console lines (rich) and a progress bar (tqdm), TensorBoard scalars, a JSONL
record of every iteration, and a per-iteration cost breakdown.

    logger = RunLogger("runs/etpo-1", total=budget)
    with logger.timer("generation"): ...          # -> time_generation_s in the next log() call
    logger.log({"reward_mean": 0.7, "env_steps": 8, "generated_tokens": 900}, step=env_steps)
    logger.close()

The cost breakdown of each logged iteration: time_<phase>_s for every timed phase (generation, sandbox, update, ...),
tokens_per_s (generated_tokens / time_generation_s), env_steps_per_s (env_steps / wall time since the previous log),
peak_rss_mb (this process's peak resident memory) and, on CUDA, peak_cuda_mb (reset after every log).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONSOLE_KEYS = ("reward_mean", "score_max", "valid_rate", "loss", "kl_to_reference", "entropy",
                "time_generation_s", "time_sandbox_s", "time_update_s", "tokens_per_s", "env_steps_per_s",
                "peak_rss_mb")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


def peak_cuda_mb(reset: bool = True) -> float | None:
    torch = sys.modules.get("torch")  # only if the run already uses torch
    if torch is None or not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 1024 ** 2
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def cost_breakdown(stats: dict[str, Any], timers: dict[str, float], wall_s: float,
                   steps_done: int) -> dict[str, float]:
    """The derived cost figures for one iteration (pure: inputs in, figures out).

    `steps_done`: env steps taken since the previous log (the difference of the logged `step`s).
    """
    out = {f"time_{name}_s": seconds for name, seconds in timers.items()}
    gen_time = stats.get("time_generation_s", out.get("time_generation_s"))
    if "tokens_per_s" not in stats and stats.get("generated_tokens") and gen_time:
        out["tokens_per_s"] = float(stats["generated_tokens"]) / float(gen_time)
    if "env_steps_per_s" not in stats and wall_s > 0:
        out["env_steps_per_s"] = steps_done / wall_s
    out["time_iteration_s"] = wall_s
    return out


class RunLogger:
    """Console + TensorBoard + JSONL logging for one run directory."""

    def __init__(self, out_dir: str | Path, total: int | None = None, tensorboard: bool = True,
                 console: bool = True, progress: bool = True, unit: str = "env step"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.console = _make_console() if console else None
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._timers: dict[str, float] = defaultdict(float)
        self._last_log = time.perf_counter()
        self._last_step = 0
        self._bar = None
        if progress and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, leave=True)
        self.history: list[dict[str, float]] = []

    @contextlib.contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        """Add the enclosed block's wall time to phase `phase` of the current iteration."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timers[phase] += time.perf_counter() - start

    def log(self, stats: dict[str, Any], step: int) -> dict[str, float]:
        """Record one iteration's numbers at `step` (env steps so far); returns what was written."""
        now = time.perf_counter()
        record = {k: float(v) for k, v in stats.items() if _is_number(v)}
        record.update({k: v for k, v in cost_breakdown(record, dict(self._timers), now - self._last_log,
                                                      step - self._last_step).items()
                       if k not in record})
        record["peak_rss_mb"] = peak_rss_mb()
        cuda = peak_cuda_mb()
        if cuda is not None:
            record["peak_cuda_mb"] = cuda
        if self.writer is not None:
            for key, value in record.items():
                if math.isfinite(value):
                    self.writer.add_scalar(_tb_tag(key), value, global_step=step)
            self.writer.flush()
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        self._jsonl.flush()
        self._print(record, step)
        if self._bar is not None:
            self._bar.update(max(0, step - self._last_step))
        self._last_step = step
        self._timers.clear()
        self._last_log = now
        self.history.append({"step": float(step), **record})
        return record

    def text(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def _print(self, record: dict[str, float], step: int) -> None:
        if self.console is None:
            return
        parts = [f"[bold]step {step}[/bold]"]
        parts += [f"{key}={_fmt(record[key])}" for key in CONSOLE_KEYS if key in record]
        if self._bar is not None:
            self._bar.write(_strip_markup(" ".join(parts)))
        else:
            self.console.print(" ".join(parts), highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _make_console():
    from rich.console import Console

    return Console(stderr=True)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes))


def _tb_tag(key: str) -> str:
    # Group the cost figures so TensorBoard shows them together.
    if key.startswith("time_") or key in ("tokens_per_s", "env_steps_per_s", "peak_rss_mb", "peak_cuda_mb"):
        return f"cost/{key}"
    return f"train/{key}"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _strip_markup(text: str) -> str:
    return text.replace("[bold]", "").replace("[/bold]", "")
