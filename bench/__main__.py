"""`python -m bench [--smoke]`: every benchmark, one JSON file each in
bench/results/, and one Markdown summary (bench/results/summary.md)."""

from __future__ import annotations

import sys

from bench import delivery, outcomes
from bench.common import RESULTS, write


def main() -> int:
    argv = sys.argv[1:]
    sections = []
    ingest = outcomes.main(argv)
    sections.append(
        "### Outcome ingest (G1, G13, G14), latency at a fixed rate (G2), write-once race (G3)\n\n"
        + outcomes.render([outcomes.Run(**r) for r in ingest["runs"]])
        + "\n\n"
        + outcomes.render_more(ingest)
    )
    write("outcomes", ingest, sections[-1])
    claims = delivery.main(argv)
    sections.append("### Claims, pickup, firing, webhooks (G4-G9)\n\n" + delivery.render(claims))
    write("delivery", claims, sections[-1])
    summary = "\n\n".join(sections)
    (RESULTS / "summary.md").write_text(summary + "\n")
    print(summary)
    race_failures = sum(
        r["errors"] + (r["executions"] - r["exactly_one_winner"]) for r in ingest["race"].values()
    )
    failed = (
        race_failures
        + sum(r["errors"] for r in ingest["runs"])
        + sum(
            r["G4"]["double_claims"]
            + r["G5"]["double_claims"]
            + r["G7"]["duplicates"]
            + r["G8"]["duplicates"]
            + r["G9"]["bad_signatures"]
            for r in claims["results"].values()
        )
    )
    if failed:
        print(
            f"{failed} correctness failures (errors, double claims, duplicates or bad signatures)",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
