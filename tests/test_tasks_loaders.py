"""Paper-suite loaders (OpenML through scikit-learn's cache, Kaggle files) and CSV tasks, on files the tests write.

No test here touches the network: `no_network` makes any socket connection or OpenML URL open fail loudly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tasks
from tasks.registry import KAGGLE_SOURCES, OPENML_IDS


@pytest.fixture
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    def connect(sock, address):  # local IPC (the sandbox's own plumbing) stays allowed
        if sock.family == socket.AF_UNIX:
            return real_connect(sock, address)
        return refuse(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import sklearn.datasets._openml as openml_module

    monkeypatch.setattr(openml_module, "urlopen", refuse)


def _gz_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(payload, f)


def write_openml_cache(data_home: Path, data_id: int, n_rows: int = 60) -> pd.DataFrame:
    """A small credit-g-like dataset in scikit-learn's OpenML cache layout (what fetch_openml stores after a download).

    Returns the frame written (features + 'class')."""
    rng = np.random.RandomState(0)
    frame = pd.DataFrame(
        {
            "duration": rng.randint(4, 60, n_rows),
            "purpose": rng.choice(["car", "radio", "education"], n_rows),
            "class": np.where(np.arange(n_rows) % 3 == 0, "bad", "good"),
        }
    )
    arff = [
        "@RELATION fake",
        "@ATTRIBUTE duration NUMERIC",
        "@ATTRIBUTE purpose {car,radio,education}",
        "@ATTRIBUTE class {good,bad}",
        "@DATA",
    ]
    arff += [f"{d},{p},{c}" for d, p, c in frame.itertuples(index=False)]
    arff_bytes = ("\n".join(arff) + "\n").encode()
    root = data_home / "openml" / "openml.org"
    file_id = 9000 + data_id
    url = f"https://www.openml.org/data/v1/download/{file_id}/fake.arff"
    _gz_json(
        root / f"api/v1/json/data/{data_id}.gz",
        {
            "data_set_description": {
                "id": str(data_id),
                "name": "credit-g",
                "version": "1",
                "description": "fake",
                "format": "ARFF",
                "url": url,
                "file_id": str(file_id),
                "default_target_attribute": "class",
                "status": "active",
                "md5_checksum": hashlib.md5(arff_bytes).hexdigest(),
            }
        },
    )
    features = [
        {"index": "0", "name": "duration", "data_type": "numeric"},
        {
            "index": "1",
            "name": "purpose",
            "data_type": "nominal",
            "nominal_values": ["car", "radio", "education"],
        },
        {
            "index": "2",
            "name": "class",
            "data_type": "nominal",
            "nominal_values": ["good", "bad"],
            "is_target": "true",
        },
    ]
    for feat in features:
        feat.setdefault("is_target", "false")
        feat.update(is_ignore="false", is_row_identifier="false", number_of_missing_values="0")
    _gz_json(root / f"api/v1/json/data/features/{data_id}.gz", {"data_features": {"feature": features}})
    _gz_json(
        root / f"api/v1/json/data/qualities/{data_id}.gz",
        {"data_qualities": {"quality": [{"name": "NumberOfInstances", "value": f"{n_rows}.0"}]}},
    )
    arff_path = root / f"data/v1/download/{file_id}/fake.arff.gz"
    arff_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(arff_path, "wb") as f:
        f.write(arff_bytes)
    return frame


def test_paper_suite_lists_the_ten_openml_and_four_kaggle_datasets():
    assert OPENML_IDS == {
        "balance-scale": 11,
        "breast-w": 15,
        "cmc": 23,
        "credit-g": 31,
        "diabetes": 37,
        "tic-tac-toe": 50,
        "eucalyptus": 188,
        "pc1": 1068,
        "airlines": 1169,
        "jungle_chess": 41027,
    }
    assert set(KAGGLE_SOURCES) == {"kidney-stone", "pharyngitis", "health-insurance", "spaceship-titanic"}
    assert set(tasks.names("paper")) == set(OPENML_IDS) | set(KAGGLE_SOURCES)
    suites = ("bundled", "hard", "paper")
    assert set(tasks.names("all")) == set().union(*(tasks.names(suite) for suite in suites))
    assert sum(len(tasks.names(suite)) for suite in suites) == len(tasks.names("all"))  # each task in one suite


def test_openml_task_loads_from_the_cache_without_network(tmp_path, no_network):
    frame = write_openml_cache(tmp_path, 31)
    task = tasks.get("credit-g", data_home=tmp_path)
    assert task.n_rows == len(frame) and task.n_features == 2
    assert sorted(task.class_names) == ["bad", "good"]
    assert sum(task.class_counts.values()) == len(frame)
    assert task.class_counts["bad"] == int((frame["class"] == "bad").sum())
    assert "OpenML dataset 31" in task.source
    split = task.dev_splits()[0]
    assert list(split.X_fit.columns) == ["duration", "purpose"]
    assert isinstance(
        split.X_fit["purpose"].dtype, pd.CategoricalDtype
    )  # OpenML nominal -> pandas categorical
    numeric = tasks.get("credit-g", data_home=tmp_path, input_format="numpy").dev_splits()[0].X_fit
    assert numeric.dtype == np.float64 and numeric.shape[1] == 2


def test_openml_task_absent_from_cache_fails_with_instructions(tmp_path, no_network):
    with pytest.raises(tasks.TaskDataMissing) as info:
        tasks.get("credit-g", data_home=tmp_path / "empty")
    message = str(info.value)
    assert "etpo tasks download credit-g" in message
    assert "fetch_openml(data_id=31" in message
    assert str(tmp_path / "empty") in message


def test_kaggle_task_reads_the_user_data_directory(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("ETPO_DATA_DIR", str(tmp_path))
    folder = tmp_path / "kaggle" / "spaceship-titanic"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(1)
    n = 80
    pd.DataFrame(
        {
            "PassengerId": [f"{i:04d}_01" for i in range(n)],
            "HomePlanet": rng.choice(["Earth", "Mars", None], n),
            "Age": np.where(rng.rand(n) < 0.1, np.nan, rng.randint(1, 70, n)),
            "Name": [f"Person {i}" for i in range(n)],
            "Transported": rng.rand(n) < 0.5,
        }
    ).to_csv(folder / "train.csv", index=False)
    task = tasks.get("spaceship-titanic")
    assert task.n_rows == n
    assert list(task.feature_table()["name"]) == ["HomePlanet", "Age"]  # id and name columns dropped
    assert task.class_names == ["False", "True"]
    assert task.has_missing and task.has_categorical


def test_kaggle_task_missing_file_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ETPO_DATA_DIR", str(tmp_path))
    with pytest.raises(tasks.TaskDataMissing) as info:
        tasks.get("spaceship-titanic")
    message = str(info.value)
    assert "kaggle competitions download -c spaceship-titanic" in message
    assert str(tmp_path / "kaggle" / "spaceship-titanic" / "train.csv") in message
    with pytest.raises(tasks.TaskDataMissing, match="kaggle datasets download -d yoshifumimiya/pharyngitis"):
        tasks.get("pharyngitis")


def test_csv_task_from_a_file_the_test_writes(tmp_path):
    rng = np.random.RandomState(2)
    n = 120
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "height": rng.normal(170, 10, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "label": rng.choice(["a", "b", "c"], n),
        }
    )
    df.loc[:9, "height"] = np.nan
    path = tmp_path / "mine.csv"
    df.to_csv(path, index=False)
    task = tasks.Task.from_csv(path, target="label", drop=["id"])
    assert task.name == "mine" and task.n_classes == 3 and task.class_names == ["a", "b", "c"]
    assert task.n_rows == n and task.n_features == 2
    assert task.feature_table().set_index("name").loc["height", "missing"] == 10
    assert task.baseline_score is None and task.normalize(0.9) is None  # nothing stored for a user CSV
    with pytest.raises(KeyError, match="target column 'nope' not found"):
        tasks.Task.from_csv(path, target="nope")
    with pytest.raises(tasks.TaskDataMissing):
        tasks.Task.from_csv(tmp_path / "absent.csv", target="label")


def test_openml_task_with_categorical_columns_runs_in_the_sandbox(tmp_path, no_network, local_sandbox):
    from sandbox import Status
    from tasks import reference

    write_openml_cache(tmp_path, 31, n_rows=80)
    task = tasks.get("credit-g", data_home=tmp_path)
    ev = tasks.evaluate(task, reference.grid_program("logistic_regression"), local_sandbox)
    assert ev.status is Status.OK, ev.result.message
    assert len(ev.split_scores) == 1 and 0.0 <= ev.score <= 1.0
