"""Paired comparison of `ape eval` reports over the same questions.

Usage: python3 scripts/paired-kl.py BASE.json[,MORE.json] OTHER.json[,MORE.json] ...

Each report holds sequential reading and one or more other settings (`--modes
sequential,ape` at one share or several). For every OTHER, prints for each setting it
shares by name with BASE (or, where each holds one setting and the names differ, for that
pair) the mean per-question difference from BASE in KL from sequential and in the task's
metric, each with its standard error, over the questions both read. Reports joined by
commas are read as one: draws of other seeds, or parts of one long sample (`--skip`).
`@SETTING` after the reports keeps that setting alone, so two settings of the same
reports compare: `A.json,B.json@ape T=1 S=1 r=0.05 attended` against
`A.json,B.json@ape T=1 S=1 r=0.08 attended`.
"""

import json
import statistics
import sys


def outcomes(paths):
    """{setting: {(seed, id, question): outcome}} over every setting but sequential, or
    the one setting named after `@`."""
    paths, _, only = paths.partition("@")
    joined, metric = {}, None
    for path in paths.split(","):
        with open(path) as f:
            report = json.load(f)
        metric = report["metric"]
        for e in report["runs"][0]["examples"]:
            for setting, outcome in zip(report["settings"], e["outcomes"]):
                if setting != "sequential" and only in ("", setting):
                    key = (report["seed"], e["id"], e["question"])
                    joined.setdefault(setting, {})[key] = outcome
    if only and not joined:
        sys.exit(f"no report of {paths} holds the setting `{only}`")
    return joined, metric


def mean_and_error(values):
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def pairs(base, other):
    shared = [s for s in other if s in base]
    if shared:
        return [(s, s) for s in shared]
    if len(base) == 1 and len(other) == 1:
        return [(next(iter(base)), next(iter(other)))]
    return []


def main(base_path, *others):
    base, metric = outcomes(base_path)
    for path in others:
        other, _ = outcomes(path)
        compared = pairs(base, other)
        if not compared:
            sys.exit(f"{path} and {base_path} share no setting")
        for base_setting, other_setting in compared:
            b, o = base[base_setting], other[other_setting]
            shared = [k for k in b if k in o]
            if len(shared) < 2:
                sys.exit(f"{path} and {base_path} share fewer than two questions")
            kl = mean_and_error([o[k]["kl_vs_sequential"] - b[k]["kl_vs_sequential"] for k in shared])
            score = mean_and_error([100 * (o[k][metric] - b[k][metric]) for k in shared])
            print(
                f"{path} [{other_setting}]: {len(shared)} questions, KL {kl[0]:+.4f} ± {kl[1]:.4f}, "
                f"{metric} {score[0]:+.1f} ± {score[1]:.1f} points"
            )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
