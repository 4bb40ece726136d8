"""Development probe, not part of the product: DRGrad against plain MMoE and the
parameter-matched MMoE on census, from two `recbalance bench quality` outputs (the matched
MMoE has its own config, so it is its own bench). Prints docs/results.md's DRGrad tables:
per task AUC and NE (mean ± std over seeds), and paired t-tests (by seed) of the
average-over-tasks NE between each pair of models; QPS and DRGrad's final μ and σ.

    python docs/probes/drgrad_census.py runs/quality-census-drgrad runs/quality-census-mmoe-matched
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from trainer.bench.quality import paired_test


def cells(report: dict, variant: str) -> dict[int, dict[str, dict[str, float]]]:
    return {c["seed"]: c["tasks"] for c in report["variants"][variant]["cells"]}


def main(drgrad_dir: str, matched_dir: str) -> None:
    main_report = json.loads((Path(drgrad_dir) / "quality.json").read_text())
    matched_report = json.loads((Path(matched_dir) / "quality.json").read_text())
    rows = {
        "MMoE (`configs/census.toml`)": cells(main_report, "equal"),
        "MMoE, DRGrad's size (`configs/census_mmoe_matched.toml`)": cells(matched_report, "equal"),
        "DRGrad (`configs/census_drgrad.toml`)": cells(main_report, "drgrad"),
    }
    seeds = sorted(next(iter(rows.values())))
    if any(sorted(r) != seeds for r in rows.values()):
        raise SystemExit(f"the benches have different seeds: {[sorted(r) for r in rows.values()]}")
    tasks = list(main_report["tasks"])
    print(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± std over seeds\n")
    print("| model | task | AUC | NE |\n| --- | --- | ---: | ---: |")
    for name, by_seed in rows.items():
        for t in tasks:
            auc = [by_seed[s][t]["auc"] for s in seeds]
            ne = [by_seed[s][t]["ne"] for s in seeds]
            print(f"| {name} | {t} | {statistics.fmean(auc):.4f} ± {statistics.stdev(auc):.4f} "
                  f"| {statistics.fmean(ne):.4f} ± {statistics.stdev(ne):.4f} |")
    avg = {name: [statistics.fmean(by_seed[s][t]["ne"] for t in tasks) for s in seeds] for name, by_seed in rows.items()}
    names = list(rows)
    print("\nAverage-over-tasks NE, paired by seed (two-sided t-test; positive difference: B is better)\n")
    print("| A | B | mean NE(A) - NE(B) | t | p |\n| --- | --- | ---: | ---: | ---: |")
    for a, b in ((names[0], names[2]), (names[1], names[2]), (names[0], names[1])):
        test = paired_test(avg[a], avg[b])
        print(f"| {a.split(' (')[0]} | {b.split(' (')[0]} | {test['mean_diff']:+.4f} | {test['t']:.3f} | {test['p']:.3g} |")
    summaries = {
        name: [json.loads((Path(d) / r["variants"][v]["cells_subdir"] / f"seed-{s}" / "summary.json").read_text())
               for s in seeds]
        for name, d, r, v in zip(names, (drgrad_dir, matched_dir, drgrad_dir), (main_report, matched_report, main_report),
                                 ("equal", "equal", "drgrad"))
    }
    qps = {name: statistics.fmean(c["qps"] for c in cs) for name, cs in summaries.items()}
    print("\nQPS (mean over seeds, cells run one after another): " + "; ".join(
        f"{name.split(' (')[0]} {q:,.0f} ({q / qps[names[0]]:.2f} of MMoE)" for name, q in qps.items()))
    extra = [c["balance_extra"] for c in summaries[names[2]]]
    print("\nDRGrad's updater at the end of training, per seed: " + "; ".join(
        f"μ' = {e['mu'][0]:.3f}, σ = ({e['sigma'][0]:.2f}, {e['sigma'][1]:.2f})" for e in extra))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
