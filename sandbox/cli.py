"""`etpo sandbox build | check | prune`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("sandbox", help="build, check and clean up the code sandbox")
    commands = parser.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="build the sandbox container image (a no-op when it is up to date)")
    build.add_argument("--offline", action="store_true",
                       help="no registry: debootstrap a Debian root file system and `docker import` it")
    build.add_argument("--force", action="store_true", help="rebuild even if an image with the same hash exists")
    build.set_defaults(func=_build)

    check = commands.add_parser("check", help="run the hostile-program suite against a backend")
    check.add_argument("--backend", default="auto", choices=["auto", "docker", "local", "unsafe-process"])
    check.add_argument("--case", action="append", dest="cases", metavar="NAME",
                       help="run only this case (repeatable); see --list")
    check.add_argument("--list", action="store_true", help="list the cases and exit")
    check.set_defaults(func=_check)

    prune = commands.add_parser("prune", help="remove sandbox containers left by processes that are gone")
    prune.add_argument("--all", action="store_true", help="remove every sandbox container, even of live processes")
    prune.set_defaults(func=_prune)


def _build(args: argparse.Namespace) -> int:
    from sandbox.images import build_image

    tag = build_image(offline=args.offline, force=args.force)
    print(tag)
    return 0


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sandbox import make_sandbox
    from sandbox.safety import CASE_NAMES, HOSTILE_LIMITS, run_suite

    console = Console()
    if args.list:
        console.print("\n".join(CASE_NAMES))
        return 0
    unknown = sorted(set(args.cases or []) - set(CASE_NAMES))
    if unknown:
        console.print(f"[red]unknown case(s): {', '.join(unknown)}[/red]")
        return 2
    table = Table(title="sandbox containment")
    for column in ("case", "contained", "status", "seconds", "detail"):
        table.add_column(column)

    def show(verdict) -> None:
        mark = "[green]yes[/green]" if verdict.contained else "[red]NO[/red]"
        console.print(f"{mark:>22} {verdict.case:<28} {verdict.status:<17} {verdict.seconds:5.1f}s")
        table.add_row(verdict.case, mark, verdict.status, f"{verdict.seconds:.1f}", verdict.detail[:100])

    with make_sandbox(args.backend, limits=HOSTILE_LIMITS, parallelism=1) as sandbox:
        console.print(f"backend: [bold]{sandbox.isolation}[/bold]")
        verdicts = run_suite(sandbox, args.cases, progress=show)
    console.print(table)
    failed = [v.case for v in verdicts if not v.contained]
    if failed:
        console.print(f"[red]{len(failed)} of {len(verdicts)} case(s) NOT contained: {', '.join(failed)}[/red]")
        return 1
    console.print(f"[green]all {len(verdicts)} cases contained ({sandbox.isolation})[/green]")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from sandbox.cgroup import prune_empty
    from sandbox.docker_backend import prune

    removed = prune(all_owners=args.all)
    print(f"removed {len(removed)} container(s)" + (f": {' '.join(removed)}" if removed else ""))
    groups = prune_empty()
    print(f"removed {len(groups)} empty worker memory cgroup(s)")
    return 0
