"""Where reference scores live: tasks/data/reference_scores.json, per split protocol, task and setting."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import cache
from pathlib import Path

from tasks.splits import PROTOCOLS, SplitProtocol

STORE_PATH = Path(__file__).parents[1] / "data" / "reference_scores.json"  # tasks/data
RECOMPUTE_COMMAND = "etpo tasks reference --recompute"


def setting_key(task) -> str:
    """Scores depend on the rows (cap) and on the input format; the key records both."""
    return f"{task.input_format}/rows={task.n_rows}"


@cache
def _cached_store(path: str, mtime: float) -> dict:
    with open(path) as f:
        return json.load(f)


def load_store(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or STORE_PATH)
    if not path.exists():
        return {"tasks": {}}
    return _cached_store(str(path), path.stat().st_mtime)


def protocol_name(protocol: SplitProtocol) -> str | None:
    """The name under which scores of `protocol` are stored (`tasks.splits.PROTOCOLS`), None for any other."""
    return next((name for name, known in PROTOCOLS.items() if known == protocol), None)


def stored_entry(task, store: dict | None = None) -> dict | None:
    """The stored entry of this task's protocol and setting ({"dev", "test", ...}), or None."""
    store = store if store is not None else load_store()
    name = protocol_name(task.split_protocol)
    protocol = store.get("protocols", {}).get(name or "", {})
    if protocol.get("split") != asdict(task.split_protocol):
        return None
    return protocol.get("tasks", {}).get(task.name, {}).get(setting_key(task))


def lookup(task, part: str = "dev") -> dict | None:
    """{"baseline", "reference", "best"} for this task's setting and part, or None if nothing matches."""
    override = getattr(task, "reference_scores", None)
    if override is not None:
        return override.get(part)
    entry = stored_entry(task)
    return entry.get(part) if entry else None


def save_store(store: dict, path: str | os.PathLike | None = None) -> Path:
    path = Path(path or STORE_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    _cached_store.cache_clear()
    return path
