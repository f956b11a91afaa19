"""PNG plots of one harness run (matplotlib, Agg backend, no display needed).

- throughput.png: outcome ingest over gRPC against the number of callers, on
  both databases, with the ceilings measured in the same run;
- latency.png: p50, p99 and max of the latency goals G2, G6, G7 and G9, with
  each goal's p99 target;
- ceilings.png: each result at the goal's caller count as a fraction of its ceiling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench.delivery import CEILED

BACKENDS = ("sqlite", "postgres")
# One colour per database: its cueline lines and its database ceiling.
COLOURS = {"sqlite": "tab:green", "postgres": "tab:blue"}
MARKERS = {"sqlite": "s", "postgres": "o"}
# The p99 target of each latency goal in BENCHMARKS.md, in milliseconds.
P99_GOALS_MS = {"G2": 10, "G6": 20, "G7": 100, "G9": 250}
LATENCY_FLOOR_MS = 0.1
LATENCY_TITLES = {
    "G2": "G2 outcome at a fixed 500/s",
    "G6": "G6 pickup (long poll)",
    "G7": "G7 fire lag, cues due at once",
    "G9": "G9 webhook, receiver 100 ms",
}
CEILING_LABELS = {
    "grpc_echo": "gRPC echo",
    "postgres_insert": "pgbench insert",
    "sqlite_commit": "SQLite commit",
    "postgres_claim": "SKIP LOCKED claim",
}


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def throughput(outcomes: dict[str, Any], path: Path) -> Path:
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    for backend in BACKENDS:
        for transport, fill in (("grpc", None), ("rest", "none")):
            runs = [r for r in outcomes["runs"] if (r["backend"], r["transport"]) == (backend, transport)]
            if runs:
                axes.plot(
                    [r["callers"] for r in runs],
                    [r["per_second"] for r in runs],
                    color=COLOURS[backend],
                    marker=MARKERS[backend],
                    markerfacecolor=fill,
                    label=f"cueline {transport}, {backend}",
                )
    ceilings = outcomes["ceilings"]
    echo = ceilings["grpc_echo"]
    axes.plot(
        [p["callers"] for p in echo],
        [p["per_second"] for p in echo],
        color="black",
        linestyle="--",
        marker=".",
        label="ceiling: gRPC echo",
    )
    inserts = ceilings.get("postgres_insert", [])
    if inserts:
        axes.plot(
            [p["clients"] for p in inserts],
            [p["per_second"] for p in inserts],
            color=COLOURS["postgres"],
            linestyle=":",
            marker=".",
            label="ceiling: pgbench durable insert",
        )
    if "sqlite_commit" in ceilings:
        axes.axhline(
            ceilings["sqlite_commit"]["per_second"],
            color=COLOURS["sqlite"],
            linestyle=":",
            label="ceiling: SQLite commits, one writer",
        )
    axes.set_xscale("log", base=2)
    axes.set_xticks(outcomes["callers"], [str(n) for n in outcomes["callers"]])
    axes.set_yscale("log")
    axes.set_xlabel("concurrent callers (pgbench: clients)")
    axes.set_ylabel("outcomes per second")
    axes.set_title("Outcome ingest (G1, G13, G14) and its ceilings, one run")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(figure, path)


def latency(outcomes: dict[str, Any], delivery: dict[str, Any], path: Path) -> Path:
    sources = {
        # G2 beside its ceiling: the gRPC echo driven at the same rate.
        "G2": {**outcomes["fixed_rate"], "echo": outcomes["ceilings"]["grpc_echo_fixed_rate"]},
        **{goal: {b: r[goal] for b, r in delivery["results"].items()} for goal in ("G6", "G7", "G9")},
    }
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    for index, (goal, by_backend) in enumerate(sources.items()):
        axes = figure.add_subplot(2, 2, index + 1)
        backends = [b for b in (*BACKENDS, "echo") if b in by_backend]
        for offset, statistic in enumerate(("p50_ms", "p99_ms", "max_ms")):
            axes.bar(
                [position + (offset - 1) * 0.27 for position in range(len(backends))],
                [max(by_backend[b][statistic], LATENCY_FLOOR_MS) for b in backends],
                width=0.27,
                label=statistic.removesuffix("_ms"),
            )
        axes.axhline(P99_GOALS_MS[goal], color="r", linestyle="--", label="p99 goal")
        axes.set_xticks(range(len(backends)), backends)
        # One bottom for every panel, so a bar's height reads the same way in each,
        # room above the goal's line, and plain numbers on the ticks.
        highest = max(by_backend[b]["max_ms"] for b in backends)
        axes.set_yscale("log")
        axes.set_ylim(LATENCY_FLOOR_MS, 2 * max(highest, P99_GOALS_MS[goal]))
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_ylabel("ms")
        axes.set_title(LATENCY_TITLES[goal], fontsize="medium")
        axes.grid(True, axis="y", which="both", alpha=0.3)
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    return _save(figure, path)


def ceilings(outcomes: dict[str, Any], delivery: dict[str, Any], path: Path) -> Path:
    """The runs at the largest caller count and the claim runs, as fractions of their ceilings."""
    compared: list[tuple[str, dict[str, Any]]] = []
    top = max(outcomes["callers"])
    for run in outcomes["runs"]:
        if run["callers"] == top:
            name = f"{run['goal']} {run['backend']} {run['transport']}, {top} callers".lstrip()
            compared += [(name, comparison) for comparison in run["of_ceilings"].values()]
    for backend, results in delivery["results"].items():
        compared += [
            (f"{g} {backend}", results[g]["of_ceiling"]) for g in CEILED if "of_ceiling" in results[g]
        ]
    bars = [
        (f"{name} / {CEILING_LABELS[c['ceiling']]}", float(c["fraction"]))
        for name, c in compared
        if c["fraction"] is not None
    ]
    figure = Figure(figsize=(8, 0.45 * len(bars) + 1.5), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(bars))
    axes.barh(positions, [100 * fraction for _, fraction in bars])
    for position, (_, fraction) in zip(positions, bars, strict=True):
        axes.annotate(f" {fraction:.1%}", (100 * fraction, position), va="center", fontsize="small")
    axes.set_yticks(positions, [label for label, _ in bars], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlim(0, 115 * max((fraction for _, fraction in bars), default=1.0))
    axes.set_xlabel("% of the ceiling measured in the same run")
    axes.set_title("cueline as a fraction of its ceilings")
    axes.grid(True, axis="x", alpha=0.3)
    return _save(figure, path)


def draw(outcomes: dict[str, Any], delivery: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        throughput(outcomes, directory / "throughput.png"),
        latency(outcomes, delivery, directory / "latency.png"),
        ceilings(outcomes, delivery, directory / "ceilings.png"),
    ]
