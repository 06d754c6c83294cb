"""The package installs as one distribution with an `etpo` console script, and its top-level names are its own."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["etpo_env", "tasks", "agents", "sandbox"])
def test_top_level_packages_resolve_to_this_project(name):
    # Run in a clean interpreter from a neutral directory so the working directory cannot shadow anything.
    code = f"import {name}, pathlib; print(pathlib.Path({name}.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).is_relative_to(ROOT / name)


def test_cli_version_and_help():
    from etpo_env import __version__

    version = subprocess.run([sys.executable, "-m", "agents.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"etpo-gym {__version__}"
    helptext = subprocess.run([sys.executable, "-m", "agents.cli", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "usage: etpo" in helptext.stdout


def test_pinned_stack_is_what_runs_here():
    """The sandbox's requirements file pins the data-science stack; the local backend must run exactly that."""
    from importlib.metadata import version

    pins = {}
    for line in (ROOT / "sandbox" / "image" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, pinned = line.split("==")
            pins[name] = pinned
    assert {"numpy", "pandas", "scikit-learn", "scipy"} <= pins.keys()
    for name, pinned in pins.items():
        assert version(name) == pinned, f"{name} {version(name)} installed but {pinned} pinned"
