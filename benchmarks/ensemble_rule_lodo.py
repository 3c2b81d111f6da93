"""Would the ensemble's rule still beat its best member on a set it was not chosen on?

    python benchmarks/ensemble_rule_lodo.py benchmarks/results/ensemble_combine.jsonl \
        --out benchmarks/results/ensemble_rule_lodo.jsonl

The ensemble's rule (which members, which member scores, which standardisation, mean or max)
was chosen by reading the real test AUROC of 96 variants on the same four dev sets it is then
reported on (`ensemble_combine_study.py`). With no fifth dataset, this script asks the next
best question, from those rows alone (nothing is refitted): hold one set out, choose the rule
by the other three sets' test results, and read what that rule does on the held-out set.
Two ways of choosing are compared with the fixed default and with a choice that reads no test
label at all:

- ``count``: most of the other three sets where the variant beats its best member, ties
  broken by the mean margin over them.
- ``mean``: the largest mean margin over the other three sets.
- ``synthetic``: on the held-out set itself, the variant with the best synthetic-task AUROC
  (normal validation images with pasted defects; no test label anywhere).
- ``default``: the rule `--method ensemble` uses (padim + patchcore, members as alone,
  mean/sd, mean).

The three choices are made twice: among all 96 variants, and among the 24 with the default
members (padim + patchcore), where only the way of combining them is chosen.

A margin is the variant's real image AUROC minus that of the best of its own members.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

Variant = tuple[str, str, str, str]
DEFAULT: Variant = ("padim+patchcore", "alone", "mean/sd", "mean")


def variant_of(row: dict) -> Variant:
    return (row["members"], row["scores"], row["standardise"], row["rule"])


def load(path: Path) -> dict[str, dict[Variant, dict]]:
    """Rows by dataset, then by variant."""
    table: dict[str, dict[Variant, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            table[row["data"]][variant_of(row)] = row
    return table


def choose(
    table: dict[str, dict[Variant, dict]], held_out: str, how: str, members: str | None
) -> Variant:
    """The variant `how` picks without reading `held_out`'s test labels."""
    variants = sorted(v for v in table[held_out] if members in (None, v[0]))
    if how == "default":
        return DEFAULT
    if how == "synthetic":
        # Ties (common: the synthetic task saturates) go to the default, then to the name order.
        return max(variants, key=lambda v: (table[held_out][v]["synthetic_auroc"], v == DEFAULT))
    others = [name for name in table if name != held_out]

    def margins(v: Variant) -> list[float]:
        return [table[name][v]["minus_best_member"] for name in others]

    if how == "count":
        return max(variants, key=lambda v: (sum(m > 0 for m in margins(v)), sum(margins(v))))
    if how == "mean":
        return max(variants, key=lambda v: sum(margins(v)))
    raise ValueError(how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = load(args.rows)
    lines = []
    choices = [("default", None)]
    choices += [(how, m) for m in (None, DEFAULT[0]) for how in ("count", "mean", "synthetic")]
    for how, members in choices:
        wins = 0
        label = how if members is None else f"{how}, members {members}"
        for held_out in sorted(table):
            v = choose(table, held_out, how, members)
            row = table[held_out][v]
            wins += row["minus_best_member"] > 0
            lines.append(
                {
                    "choice": how,
                    "members_fixed": members,
                    "held_out": held_out,
                    "members": v[0],
                    "scores": v[1],
                    "standardise": v[2],
                    "rule": v[3],
                    "real_image_auroc": row["real_image_auroc"],
                    "best_member": row["best_member"],
                    "best_member_auroc": row["best_member_auroc"],
                    "minus_best_member": row["minus_best_member"],
                }
            )
            print(
                f"{how:9s} {held_out:14s} {'+'.join(v[1:]):28s} {v[0]:22s} "
                f"{row['real_image_auroc']:.3f} vs {row['best_member']} "
                f"{row['best_member_auroc']:.3f} ({row['minus_best_member']:+.3f})"
            )
        print(f"{label}: beats its best member on {wins} of {len(table)} held-out sets\n")
    if args.out:
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
