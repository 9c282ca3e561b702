"""The quality job's three-way split of jobs/data/e2e/devset.csv by restaurant (issue 32 item 5).

    python bench/e2e_split.py [--check]

Writes, beside devset.csv:

* ``devset-select.csv``: the restaurants the main job's ``data.split: name`` holds out (the first
  names in sha256 order up to 10% of the MRs: the 68 MRs every earlier figure was scored on, so
  every choice made so far was made on them). The quality job validates, early-stops and is
  tuned on these only.
* ``devset-report.csv``: the next names in the same order, until 15% of the MRs: restaurants no
  job, benchmark or choice has seen. The quality figure is scored on these, once per adapter.
* ``devset-train.csv``: every other restaurant.

Every row of devset.csv goes to exactly one file, in its original order, whole restaurants only
(an MR without a name is its own unit). ``--check`` rewrites nothing and exits 1 if a file differs
from what this script would write.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "jobs" / "data" / "e2e"
SELECT_FRACTION, REPORT_FRACTION = 0.1, 0.15  # of the development set's distinct MRs


def units(rows: list[dict]) -> dict[str, set[str]]:
    """{unit: its distinct MRs}: a restaurant (``name:<name>``), or an MR without a name."""
    from lora_dist.slots import parse_mr

    out: dict[str, set[str]] = {}
    for r in rows:
        name = parse_mr(r["mr"]).get("name")
        out.setdefault(f"name:{name}" if name else f"mr:{r['mr']}", set()).add(r["mr"])
    return out


def three_ways(rows: list[dict]) -> dict[str, list[dict]]:
    """{"select", "report", "train": rows}: names in sha256 order (as ``sources.split_by_name``)
    to select until it holds SELECT_FRACTION of the MRs, then to report until REPORT_FRACTION more."""
    by_unit = units(rows)
    total = sum(len(m) for m in by_unit.values())
    side: dict[str, str] = {}
    held = {"select": 0, "report": 0}
    for u in sorted(by_unit, key=lambda u: hashlib.sha256(u.encode()).hexdigest()):
        if held["select"] < SELECT_FRACTION * total:
            which = "select"
        elif held["report"] < REPORT_FRACTION * total:
            which = "report"
        else:
            which = "train"
        side[u] = which
        if which != "train":
            held[which] += len(by_unit[u])
    mr_side = {mr: side[u] for u, mrs in by_unit.items() for mr in mrs}
    out: dict[str, list[dict]] = {"train": [], "select": [], "report": []}
    for r in rows:
        out[mr_side[r["mr"]]].append(r)
    return out


def as_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mr", "ref"])
    w.writerows([r["mr"], r["ref"]] for r in rows)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = ap.parse_args()
    with open(E2E / "devset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stale = []
    for name, part in three_ways(rows).items():
        path = E2E / f"devset-{name}.csv"
        text = as_csv(part)
        mrs = len({r["mr"] for r in part})
        attrs = sum(len(mr.split("], ")) for mr in {r["mr"] for r in part}) / mrs
        restaurants = len(units(part))
        print(f"{path.name}: {restaurants} restaurants, {mrs} MRs ({attrs:.2f} attributes per MR), {len(part)} rows")
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"differs from what this script writes: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
