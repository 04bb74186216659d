"""Paired comparison of `ape eval` reports over the same questions.

Usage: python3 scripts/paired-kl.py BASE.json[,MORE.json] OTHER.json[,MORE.json] ...

Each report holds sequential reading and one other setting (`--modes sequential,ape` at
one share). For every OTHER, prints the mean per-question difference from BASE in KL from
sequential and in the task's metric, each with its standard error: the reports must have
read the same questions (same task, split, seed and --n). Reports joined by commas are
read as one: draws of other seeds.
"""

import json
import statistics
import sys


def outcomes(paths):
    joined, metric = {}, None
    for path in paths.split(","):
        with open(path) as f:
            report = json.load(f)
        metric = report["metric"]
        for e in report["runs"][0]["examples"]:
            joined[(report["seed"], e["id"], e["question"])] = e["outcomes"][1]
    return joined, metric


def mean_and_error(values):
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def main(base_path, *others):
    base, metric = outcomes(base_path)
    for path in others:
        other, _ = outcomes(path)
        shared = [k for k in base if k in other]
        if len(shared) < 2:
            sys.exit(f"{path} and {base_path} share fewer than two questions")
        kl = mean_and_error(
            [other[k]["kl_vs_sequential"] - base[k]["kl_vs_sequential"] for k in shared]
        )
        score = mean_and_error([100 * (other[k][metric] - base[k][metric]) for k in shared])
        print(
            f"{path}: {len(shared)} questions, KL {kl[0]:+.4f} ± {kl[1]:.4f}, "
            f"{metric} {score[0]:+.1f} ± {score[1]:.1f} points"
        )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
