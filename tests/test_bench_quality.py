"""`recbalance bench quality` end to end on a tiny config: the files, the arithmetic (NE gain
and the paired t-test recomputed by hand from the cells' summary.json), resume of a
half-finished run, and bad --methods caught before any training."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from scipy import stats

from tests.test_cli_train import ROOT, recbalance, tiny_overrides

TASKS = ["click", "conversion"]


def tiny_sets(data: Path) -> list[str]:
    """The CLI tests' tiny model, 6 steps a cell, no metrics endpoint (later --set wins)."""
    sets = ["train.steps=6", "train.log_every=3", "metrics.enabled=false"]
    return tiny_overrides(data) + [arg for s in sets for arg in ("--set", s)]


def quality(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return recbalance("bench", "quality", "--config", "configs/demo.toml", *tiny_sets(data), "--methods",
                      "multibalance", "--seeds", "2", "--nproc-per-node", "1", "--output-dir", str(out), *extra)


def mean(xs):
    return sum(xs) / len(xs)


def sample_std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def by_hand_t_test(ref: list[float], method: list[float]) -> tuple[float, float]:
    d = [a - b for a, b in zip(ref, method)]
    n = len(d)
    t = mean(d) / (sample_std(d) / math.sqrt(n))
    return t, 2 * stats.t.sf(abs(t), df=n - 1)


def test_bench_quality_end_to_end_arithmetic_and_resume(tiny_dataset, tmp_path):
    out = tmp_path / "bench"
    # a hand-written finished cell: it must be used as is (not trained) and show up in the aggregate
    hand = out / "cells" / "equal" / "seed-1"
    hand.mkdir(parents=True)
    hand_tasks = {"click": {"ne": 0.95, "auc": 0.61, "loss": 0.5}, "conversion": {"ne": 1.05, "auc": 0.57, "loss": 0.6}}
    (hand / "summary.json").write_text(json.dumps({"tasks": hand_tasks}))

    proc = quality(tiny_dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # equal is added as the reference; only the 3 missing cells are trained
    assert "4 cells, 1 already finished, 3 to train" in proc.stdout
    assert "cell 2/4  equal  seed 1  finished earlier" in proc.stdout
    assert "cell 4/4  multibalance  seed 1  training  elapsed" in proc.stdout and "ETA" in proc.stdout
    assert "test AUC click=" in proc.stdout
    assert not (hand / "config.json").exists()

    cells = {(v, s): json.loads((out / "cells" / v / f"seed-{s}" / "summary.json").read_text())
             for v in ("equal", "multibalance") for s in (0, 1)}
    assert cells[("equal", 1)]["tasks"] == hand_tasks
    assert cells[("multibalance", 0)]["method"] == "multibalance" and cells[("multibalance", 0)]["steps"] == 6
    assert cells[("equal", 0)]["eval_split"] == "test"

    report = json.loads((out / "quality.json").read_text())
    assert report["reference"] == "equal" and report["eval_split"] == "test"
    assert report["seeds"] == [0, 1] and report["tasks"] == TASKS
    assert list(report["variants"]) == ["equal", "multibalance"]

    ne = {v: {t: [cells[(v, s)]["tasks"][t]["ne"] for s in (0, 1)] for t in TASKS} for v in ("equal", "multibalance")}
    auc = {v: {t: [cells[(v, s)]["tasks"][t]["auc"] for s in (0, 1)] for t in TASKS} for v in ("equal", "multibalance")}
    approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-12)  # noqa: E731
    for v, row in report["variants"].items():
        assert [c["seed"] for c in row["cells"]] == [0, 1]
        gains = []
        for t in TASKS:
            m = row["tasks"][t]
            assert m["auc_mean"] == approx(mean(auc[v][t])) and m["auc_std"] == approx(sample_std(auc[v][t]))
            assert m["ne_mean"] == approx(mean(ne[v][t])) and m["ne_std"] == approx(sample_std(ne[v][t]))
            if v == "equal":  # the hand-written cell has no calibration: no mean rather than a partial one
                assert m["calibration_mean"] is None
            else:
                assert m["calibration_mean"] == approx(mean([cells[(v, s)]["tasks"][t]["calibration"] for s in (0, 1)]))
            gain = 100 * (mean(ne["equal"][t]) - mean(ne[v][t])) / mean(ne["equal"][t])
            assert m["ne_gain_pct"] == approx(gain)
            gains.append(gain)
            if v == "equal":
                assert m["ne_p"] is None
            else:
                t_stat, p = by_hand_t_test(ne["equal"][t], ne[v][t])
                assert (m["ne_t"], m["ne_p"]) == (approx(t_stat), approx(p))
        assert row["avg_ne_gain_pct"] == approx(mean(gains))
    assert report["variants"]["equal"]["avg_ne_gain_pct"] == 0.0
    avg = {v: [mean([ne[v][t][i] for t in TASKS]) for i in range(2)] for v in ("equal", "multibalance")}
    t_stat, p = by_hand_t_test(avg["equal"], avg["multibalance"])
    test = report["variants"]["multibalance"]["test"]
    assert test["n"] == 2 and test["t"] == approx(t_stat) and test["p"] == approx(p)
    assert test["mean_diff"] == approx(mean([a - b for a, b in zip(avg["equal"], avg["multibalance"])]))

    md = (out / "quality.md").read_text()
    assert md.count("| multibalance | ") == 3 and "| equal | +0.00% | — | reference | 2 |" in md
    assert f"{report['variants']['multibalance']['avg_ne_gain_pct']:+.2f}%" in md
    assert (out / "quality.png").stat().st_size > 0

    # resume: a bench killed after a cell's training but before its summary.json was read
    # retrains only that cell (whose own training resumes from its checkpoint)
    missing = out / "cells" / "multibalance" / "seed-0" / "summary.json"
    missing.unlink()
    others = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/seed-*/summary.json")}
    proc = quality(tiny_dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cells, 3 already finished, 1 to train" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert json.loads(missing.read_text())["resumed_from_step"] == 6
    again = json.loads((out / "quality.json").read_text())
    assert again["variants"]["equal"] == report["variants"]["equal"]


def test_parse_methods_names_and_options():
    from trainer.bench.quality import parse_methods

    variants = parse_methods("multibalance:ema=false;beta=0.5, static:weights=[1,2],cograd")
    assert [v.name for v in variants] == ["equal", "multibalance[beta=0.5,ema=false]", "static[weights=[1,2]]",
                                          "cograd"]
    assert variants[1].options == {"ema": False, "beta": 0.5} and variants[2].options == {"weights": [1, 2]}
    assert [v.name for v in parse_methods("cograd,equal")] == ["cograd", "equal"]  # not added twice
    assert parse_methods("multibalance:direction=cosine")[1].options == {"direction": "cosine"}


@pytest.mark.parametrize(
    "methods, message",
    [
        ("equal,magic", "--methods: unknown method 'magic' (in 'magic'); allowed: "),
        ("multibalance:ema", "--methods item 'multibalance:ema': option 'ema' is not KEY=VALUE"),
        ("multibalance:", "no options after ':'"),
        ("multibalance:foo=1", "option 'foo' is not valid for method 'multibalance'; allowed options: "),
        ("multibalance:ema=false;ema=true", "option 'ema' given twice"),
        ("equal,,multibalance", "empty item"),
        ("multibalance,multibalance", "'multibalance' is listed twice"),
        ("multibalance:beta=-1", "--methods 'multibalance[beta=-1]': balance option 'beta'"),
    ],
)
def test_bad_methods_stop_before_training(tiny_dataset, tmp_path, capsys, methods, message):
    from trainer.run.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "quality", "--config", str(ROOT / "configs/demo.toml"), *tiny_sets(tiny_dataset),
                 "--methods", methods, "--seeds", "2", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("recbalance: error: ") and message in err
    if "allowed" in message:  # the allowed names are listed
        assert ("multibalance, " if "unknown method" in message else "ema") in err
    assert not out.exists()


def test_finished_cell_with_another_config_is_an_error(tiny_dataset, tmp_path, capsys):
    from trainer.run.cli import main

    cell = tmp_path / "bench" / "cells" / "equal" / "seed-0"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text(json.dumps({"tasks": {}}))
    from trainer.config import load_config

    written = load_config(ROOT / "configs/demo.toml", tiny_sets(tiny_dataset)[1::2]).to_dict()
    written["balance"].update(method="equal", options={})  # the cell's method (demo.toml's may differ)
    written["train"]["steps"] = 99  # the finished cell was trained for longer than asked now
    (cell / "config.json").write_text(json.dumps(written))
    code = main(["bench", "quality", "--config", str(ROOT / "configs/demo.toml"), *tiny_sets(tiny_dataset),
                 "--methods", "equal", "--seeds", "1", "--output-dir", str(tmp_path / "bench")])
    err = capsys.readouterr().err
    assert code == 2 and "was trained with a different config (train.steps);" in err
    assert sorted(p.name for p in cell.iterdir()) == ["config.json", "summary.json"]


def test_one_seed_reports_no_test(tmp_path):
    from trainer.bench.quality import aggregate, format_tables, parse_methods, write_report

    variants = parse_methods("cograd")
    summaries = {("equal", 0): {"tasks": {"a": {"ne": 0.8, "auc": 0.7}, "b": {"ne": 1.0, "auc": float("nan")}}},
                 ("cograd", 0): {"tasks": {"a": {"ne": 0.76, "auc": 0.72}, "b": {"ne": 1.02, "auc": 0.6}}}}
    report = {"seeds": [0], "model": "mmoe", "level": "representation", "global_batch_size": 64, "steps": 6,
              "epochs": 1.0, **aggregate(variants, [0], summaries)}
    row = report["variants"]["cograd"]
    assert row["tasks"]["a"]["ne_gain_pct"] == pytest.approx(5.0)  # 100 * (0.8 - 0.76) / 0.8
    assert row["tasks"]["b"]["ne_gain_pct"] == pytest.approx(-2.0)
    assert row["avg_ne_gain_pct"] == pytest.approx(1.5)
    assert row["tasks"]["a"]["ne_std"] is None and row["tasks"]["a"]["ne_p"] is None
    assert row["test"]["p"] is None and row["test"]["t"] is None and "fewer than 2 seeds" in row["test"]["note"]
    write_report(report, tmp_path)
    written = json.loads((tmp_path / "quality.json").read_text())  # strict JSON: the NaN AUC became null
    assert written["variants"]["equal"]["tasks"]["b"]["auc_mean"] is None
    assert "fewer than 2 seeds there is no test" in (tmp_path / "quality.md").read_text()
    assert "| cograd | +1.50% | n/a | n/a | 1 |" in format_tables(written)


def test_noise_floor_trains_equal_up_to_rounding(tiny_dataset, tmp_path):
    """--noise-floor adds static weights 0.5: under Adam and row-wise Adagrad the same training
    as equal weights in exact arithmetic, so after a few steps their NE agree to rounding."""
    out = tmp_path / "bench"
    proc = quality(tiny_dataset, out, "--noise-floor", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
    floor = "static[weights=[0.5,0.5]]"
    assert report["noise_floor"] == floor and list(report["variants"]) == ["equal", floor, "multibalance"]
    for task in TASKS:
        equal_ne = report["variants"]["equal"]["tasks"][task]["ne_mean"]
        assert report["variants"][floor]["tasks"][task]["ne_mean"] == pytest.approx(equal_ne, rel=1e-4)
    text = (out / "quality.md").read_text()
    assert f"Noise floor: {floor} is equal weights with the balanced gradient halved" in text
    assert "| multibalance | " in text.split("tasks within the floor")[1]


def test_noise_floor_lines_name_the_tasks_within_it():
    from trainer.bench.quality import aggregate, noise_floor_lines, parse_methods

    variants = parse_methods("equal,static:weights=[0.5,0.5],cograd")
    ne = {"equal": (0.80, 1.00), "static[weights=[0.5,0.5]]": (0.801, 0.99), "cograd": (0.8004, 1.02)}
    summaries = {(name, 0): {"tasks": {"a": {"ne": a, "auc": 0.7}, "b": {"ne": b, "auc": 0.7}}}
                 for name, (a, b) in ne.items()}
    report = {"seeds": [0], **aggregate(variants, [0], summaries)}
    lines = noise_floor_lines(report, "static[weights=[0.5,0.5]]")
    assert "a -0.13%, b +1.00%" in lines[0]  # the floor's own gains
    assert lines[-1] == "| cograd | a |"  # a: 0.05% <= 0.125%; b: 2% > 1%


@pytest.mark.parametrize("setting, key", [("train.embedding_optimizer=\"sgd\"", "train.embedding_optimizer"),
                                          ("train.weight_decay=0.001", "train.weight_decay")])
def test_noise_floor_refused_where_the_scale_matters(tiny_dataset, tmp_path, capsys, setting, key):
    from trainer.run.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "quality", "--config", str(ROOT / "configs/demo.toml"), *tiny_sets(tiny_dataset),
                 "--set", setting, "--methods", "equal", "--seeds", "1", "--noise-floor", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--noise-floor needs" in err and key in err
    assert not out.exists()
