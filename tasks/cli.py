"""`etpo tasks ...`: list the suite, show one task, recompute reference scores, download paper datasets."""

from __future__ import annotations

import argparse

SUITE_CHOICES = ["bundled", "hard", "paper", "all"]  # tasks.SUITES (not imported: `etpo --help` stays light)
PROTOCOL_CHOICES = ["holdout", "paper"]  # tasks.splits.PROTOCOLS (a test keeps the two in step)


def register(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="the task suite: list, show, reference scores, downloads")
    sub = parser.add_subparsers(dest="tasks_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    p = sub.add_parser("list", help="the suite as a table (rows, features, classes, missing %%, scores, headroom)")
    p.add_argument("--suite", default="bundled", choices=SUITE_CHOICES)
    p.add_argument("--max-rows", type=int, default=None, help="row cap (default: the tasks default)")
    p.add_argument("--input-format", default="pandas", choices=["pandas", "numpy"])
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="one task: description as prompts show it, feature table, splits")
    p.add_argument("name")
    p.add_argument("--style", default="rich", choices=["paper", "rich"])
    p.add_argument("--input-format", default="pandas", choices=["pandas", "numpy"])
    p.set_defaults(func=_show)

    p = sub.add_parser("reference", help="show (or --recompute) the stored baseline/reference scores")
    p.add_argument(
        "--recompute", action="store_true", help="run the reference programs in the sandbox and store"
    )
    p.add_argument(
        "--task", action="append", help="only these tasks (repeatable); default: the tasks of --suite"
    )
    p.add_argument(
        "--suite",
        default="bundled",
        choices=SUITE_CHOICES,
        help="the suite to compute (hard: FLAML-searched references, pandas input)",
    )
    p.add_argument(
        "--input-format",
        action="append",
        choices=["pandas", "numpy"],
        help="formats to compute (repeatable; default: pandas and numpy; pandas only for the hard suite)",
    )
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument(
        "--protocol",
        default="holdout",
        choices=PROTOCOL_CHOICES,
        help="split protocol to compute (holdout: the default; paper: 5 random 50/50 splits, open to cross-fold "
        "channels)",
    )
    p.add_argument("--backend", default="local", help="sandbox backend (scores do not depend on it)")
    p.add_argument("--workers", type=int, default=2, help="programs run concurrently")
    p.add_argument("--out", default=None, help="store file (default: tasks/data/reference_scores.json)")
    p.set_defaults(func=_reference)

    p = sub.add_parser(
        "download", help="fetch paper datasets (OpenML through scikit-learn; Kaggle: instructions)"
    )
    p.add_argument("names", nargs="*", help="paper task names (default: all)")
    p.add_argument("--data-home", default=None, help="scikit-learn data home for the OpenML cache")
    p.set_defaults(func=_download)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(fraction: float) -> str:
    return "<0.1" if 0 < fraction < 0.0005 else f"{100 * fraction:.1f}"


def _get_kwargs(args: argparse.Namespace) -> dict:
    from tasks import DEFAULT_MAX_ROWS

    return {"max_rows": args.max_rows or DEFAULT_MAX_ROWS, "input_format": args.input_format}


def _list(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    import tasks
    from tasks.registry import spec

    # Compact so that 80 columns show every row whole: the source's collection only; `etpo tasks show NAME` has
    # the full source and the reference pipeline.
    table = Table(title=f"etpo-gym tasks ({args.suite} suite, {args.input_format} input)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for column in ("task", "rows", "feat.", "cls", "miss %", "source", "base", "ref.", "forest"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("task", "source") else "right")
    any_headroom = any_missing = False
    for name in tasks.names(args.suite):
        try:
            task = tasks.get(name, **_get_kwargs(args))
        except tasks.TaskDataMissing:
            table.add_row(name, "-", "-", "-", "-", spec(name).origin.split()[0], "-", "-", "-")
            any_missing = True
            continue
        from tasks.reference import headroom, lookup

        entry = lookup(task) or {}
        any_headroom = any_headroom or headroom(task) is not None
        table.add_row(
            name,
            str(task.n_rows),
            str(task.n_features),
            str(task.n_classes),
            _percent(task.missing_fraction),
            spec(name).origin.split()[0],
            _fmt(entry.get("baseline")),
            _fmt(entry.get("reference")),
            _fmt(headroom(task)),
        )
    Console().print(table)
    if any_missing:
        print("-: not downloaded yet (etpo tasks download NAME)")
    if any_headroom:
        print("forest: default random forest, normalized dev score (headroom if well below 1)")
    return 0


def _show(args: argparse.Namespace) -> int:
    import tasks

    task = tasks.get(args.name, input_format=args.input_format)
    print(task.describe(args.style))
    rows = {role: len(r) for role, r in task.scored_rows().items()}
    print(
        f"\nrows: {rows['fit']} fitting (the only labels programs see), {rows['reward']} reward, {rows['test']} test "
        f"({task.split_protocol.method}, {task.split_protocol.n_splits} fit(s) per reward); "
        f"baseline {_fmt(task.baseline_score)}, reference {_fmt(task.reference_score)}"
    )
    return 0


def _reference(args: argparse.Namespace) -> int:
    import tasks
    from tasks import reference

    if not args.recompute:
        store = reference.load_store(args.out)
        stored = store.get("protocols", {}).get(args.protocol, {}).get("tasks", {})
        print(f"protocol {args.protocol}:")
        for name, settings in sorted(stored.items()):
            for key, entry in sorted(settings.items()):
                dev, test = entry["dev"], entry["test"]
                forest = entry.get("headroom", {}).get("default_forest_normalized")
                print(
                    f"{name:18s} {key:22s} dev: baseline {_fmt(dev['baseline'])} reference {_fmt(dev['reference'])}"
                    f" ({dev['best']}); test: {_fmt(test['baseline'])} / {_fmt(test['reference'])}"
                    + ("" if forest is None else f"; default forest normalized {_fmt(forest)}")
                )
        print(f"\n(recompute: {reference.RECOMPUTE_COMMAND}; hard suite: {reference.HARD_COMMAND})")
        return 0

    from sandbox import Limits, make_sandbox
    from tasks.splits import PROTOCOLS

    names = args.task or tasks.names(args.suite)
    formats = args.input_format or (["pandas"] if args.suite == "hard" else ["pandas", "numpy"])
    task_list = [
        tasks.get(
            name,
            max_rows=args.max_rows or tasks.DEFAULT_MAX_ROWS,
            input_format=fmt,
            split=PROTOCOLS[args.protocol],
        )
        for name in names
        for fmt in formats
    ]

    def progress(task, entry) -> None:
        dev = entry["dev"]
        forest = entry.get("headroom", {}).get("default_forest_normalized")
        print(
            f"{task.name:18s} {task.input_format:6s} baseline {dev['baseline']:.4f} reference "
            f"{dev['reference']:.4f} ({dev['best']})"
            + ("" if forest is None else f", default forest normalized {forest:.3f}"),
            flush=True,
        )

    # Generous limits: a reference trial must never fail because a shared machine was slow.
    limits = Limits(wall_time_s=600.0, cpu_time_s=600)
    with make_sandbox(args.backend, limits=limits, parallelism=args.workers) as sandbox:
        reference.recompute(task_list, sandbox, path=args.out, workers=args.workers, progress=progress)
    return 0


def _download(args: argparse.Namespace) -> int:
    import tasks
    from tasks.loaders import TaskDataMissing, user_data_dir
    from tasks.registry import spec

    status = 0
    for name in args.names or tasks.names("paper"):
        s = spec(name)
        if s.openml_id is not None:
            s.load(data_home=args.data_home, download=True)
            print(f"{name}: OpenML {s.openml_id} cached")
        elif s.kaggle is not None:
            try:
                s.load()
                print(f"{name}: present")
            except TaskDataMissing:
                print(
                    f"{name}: Kaggle data must be downloaded by you.\n{s.kaggle.how_to_get(user_data_dir())}"
                )
                status = 1
        else:
            print(f"{name}: bundled, nothing to download")
    return status
