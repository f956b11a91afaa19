"""`python -m bench [--smoke]`: every benchmark with its ceilings, one JSON file
each in bench/results/, one Markdown summary (bench/results/summary.md) and the
plots: in docs/bench/ after a full run, in bench/results/ after a smoke run (so
a smoke run never changes the committed ones)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench import delivery, outcomes, plots
from bench.common import RESULTS, Plan, write
from bench.progress import phase

PLOTS = Path(__file__).resolve().parents[1] / "docs" / "bench"


def failures(ingest: dict[str, Any], claims: dict[str, Any]) -> int:
    """Correctness failures: errors (closed and open loop), races without exactly
    one winner, double claims, duplicate executions, due cues that never fired,
    webhooks that never arrived or carried a bad signature."""
    return int(
        sum(r["errors"] + (r["executions"] - r["exactly_one_winner"]) for r in ingest["race"].values())
        + sum(r["errors"] for r in ingest["runs"])
        + sum(r["errors"] for r in ingest["fixed_rate"].values())
        + sum(
            sum(r[g]["double_claims"] + r[g]["errors"] for g in delivery.CEILED)
            + sum(r[g]["duplicates"] + r[g]["cues"] - r[g]["fired"] for g in ("G7", "G8", "G8cron", "steady"))
            + r["G9"]["bad_signatures"]
            + max(0, r["G9"]["fired"] - r["G9"]["deliveries"])
            for r in claims["results"].values()
        )
    )


def main() -> int:
    argv = sys.argv[1:]
    plan = Plan.parse(argv, __doc__.splitlines()[0])
    ingest = outcomes.main(argv)
    ingest_md = (
        "### Outcome ingest (G1, G13, G14) with ceilings, latency at a fixed rate (G2), write-once race (G3)"
    )
    ingest_md += "\n\n" + outcomes.render(ingest)
    write("outcomes", ingest, ingest_md)
    claims = delivery.main(argv)
    claims_md = "### Claims, pickup, firing, webhooks (G4-G9)\n\n" + delivery.render(claims)
    write("delivery", claims, claims_md)
    servers = (
        f"The server runs {plan.processes} process{'es' if plan.processes > 1 else ''} on PostgreSQL"
        " (`CUELINE_PROCESSES`), one on SQLite."
    )
    summary = f"{servers}\n\n{ingest_md}\n\n{claims_md}"
    (RESULTS / "summary.md").write_text(summary + "\n")
    with phase("plots"):
        drawn = plots.draw(ingest, claims, RESULTS if plan.smoke else PLOTS)
    print(summary)
    print("\nplots: " + ", ".join(str(p) for p in drawn))
    failed = failures(ingest, claims)
    if failed:
        print(
            f"{failed} correctness failures (errors, double claims, duplicates, cues"
            " that never fired, undelivered or badly signed webhooks)",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
