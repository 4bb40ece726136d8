"""`recbalance bench quality`: test AUC and NE of balancing methods over several seeds,
against equal weights (the MultiBalance paper's Table 3 on the user's own data).

Every (variant, seed) cell is one ordinary training whose output directory is
``DIR/cells/<variant>/seed-<seed>/``; a cell whose summary.json exists is not trained again,
so a killed bench continues where it stopped (and a half-trained cell resumes from its own
checkpoints). The aggregate is computed from the cells' summary.json files only."""
from __future__ import annotations

import json
import math
import re
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.config import Config, ConfigError, config_from_dict, load_config

REFERENCE = "equal"
EVAL_SPLIT = "test"
#: --noise-floor: equal weights with the shared gradient halved (any constant scale would do)
NOISE_FLOOR_SCALE = 0.5
# config keys that do not change what a cell learns; a finished cell is reused when only these differ
_IGNORED_FOR_REUSE = {"metrics", "checkpoint", "train.log_every", "train.threads_per_rank", "data.prefetch"}


# ---------------------------------------------------------------------------------------------
# --methods: name[:key=value;key=value], items separated by commas
# ---------------------------------------------------------------------------------------------

@dataclass
class MethodVariant:
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """`multibalance` or `multibalance[beta=0.5,ema=false]` (options sorted by key)."""
        if not self.options:
            return self.method
        return f"{self.method}[" + ",".join(f"{k}={_format_value(v)}" for k, v in sorted(self.options.items())) + "]"

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.,=\[\]+-]", "_", self.name)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at `sep` outside [...] and quotes, so `static:weights=[1,2],equal` has two items."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


METHODS_SYNTAX = ("expected comma-separated items NAME or NAME:KEY=VALUE;KEY=VALUE, "
                  "e.g. equal,multibalance,multibalance:ema=false")


def parse_methods(text: str) -> list[MethodVariant]:
    """Parse and check --methods (names and option names; option values are checked by preflight).
    `equal` is put first when missing: it is the reference every gain and test is against."""
    from balancing import available_methods, method_options

    allowed = available_methods()
    variants: list[MethodVariant] = []
    items = [item.strip() for item in _split_top_level(text, ",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"--methods {text!r}: empty item; {METHODS_SYNTAX}")
    for item in items:
        name, _, opts = item.partition(":")
        name = name.strip()
        if name not in allowed:
            raise ConfigError(f"--methods: unknown method {name!r} (in {item!r}); allowed: {', '.join(allowed)}")
        options: dict[str, Any] = {}
        if ":" in item:
            if not opts.strip():
                raise ConfigError(f"--methods item {item!r}: no options after ':'; {METHODS_SYNTAX}")
            valid = method_options(name)
            for opt in _split_top_level(opts, ";"):
                key, eq, raw = opt.partition("=")
                key = key.strip()
                if not eq or not key or not raw.strip():
                    raise ConfigError(f"--methods item {item!r}: option {opt!r} is not KEY=VALUE; {METHODS_SYNTAX}")
                if key not in valid:
                    raise ConfigError(
                        f"--methods item {item!r}: option {key!r} is not valid for method {name!r}; "
                        f"allowed options: {', '.join(valid) or '(none)'}"
                    )
                if key in options:
                    raise ConfigError(f"--methods item {item!r}: option {key!r} given twice")
                options[key] = _parse_value(raw.strip())
        variant = MethodVariant(name, options)
        if any(v.name == variant.name for v in variants):
            raise ConfigError(f"--methods: {variant.name!r} is listed twice")
        variants.append(variant)
    if not any(v.name == REFERENCE for v in variants):
        variants.insert(0, MethodVariant(REFERENCE))
    return variants


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as direction=cosine is a string


def noise_floor_variant(cfg: Config) -> MethodVariant:
    """The --noise-floor variant: `static` with every weight 0.5, i.e. equal weights with the
    balanced gradient halved. Adam (dense) and Adagrad / row-wise Adagrad (embeddings) are
    invariant to a constant gradient scale (up to their eps), so in exact arithmetic it trains
    the model equal weights trains; it differs only by float rounding, and its distance from
    equal shows how far rounding alone (amplified by training) moves a comparison over these
    seeds. SGD and weight decay are not scale-invariant: refused, naming the key."""
    from trainer.data.schema import Schema

    if cfg.train.embedding_optimizer == "sgd":
        raise ConfigError("--noise-floor needs a scale-invariant embedding optimizer: train.embedding_optimizer "
                          "is 'sgd'; allowed with --noise-floor: 'adagrad', 'rowwise_adagrad'")
    if cfg.train.weight_decay != 0:
        raise ConfigError(f"--noise-floor needs train.weight_decay = 0 (weight decay is not invariant to the "
                          f"gradient's scale), got {cfg.train.weight_decay}")
    num_tasks = len(Schema.load(cfg.data.path).labels)
    return MethodVariant("static", {"weights": [NOISE_FLOOR_SCALE] * num_tasks})


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------

@dataclass
class Cell:
    variant: MethodVariant
    seed: int
    directory: Path
    config: Config


def cell_config(base: dict[str, Any], variant: MethodVariant, seed: int, directory: Path) -> Config:
    """The base config with the variant's method and options, the seed, the test split and the
    cell's own checkpoint directory. Options from the config file's [balance] apply only to the
    variants of the method the config names; the --methods options override them."""
    raw = json.loads(json.dumps(base))
    balance = raw.setdefault("balance", {})
    options = dict(balance.get("options", {})) if balance.get("method") == variant.method else {}
    options.update(variant.options)
    balance.update(method=variant.method, options=options)
    raw["train"]["seed"] = seed
    raw["data"]["eval_split"] = EVAL_SPLIT
    raw["checkpoint"]["dir"] = str(directory / "checkpoints")  # never shared between cells
    if raw["metrics"].get("run_id"):
        raw["metrics"]["run_id"] = f"{raw['metrics']['run_id']}-{variant.dirname}-seed{seed}"
    return config_from_dict(raw)


def plan_cells(base: Config, variants: list[MethodVariant], seeds: list[int], output_dir: Path) -> list[Cell]:
    cells = []
    for v in variants:
        for s in seeds:
            directory = output_dir / "cells" / v.dirname / f"seed-{s}"
            cells.append(Cell(v, s, directory, cell_config(base.to_dict(), v, s, directory)))
    return cells


def _relevant(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, values in config.items():
        if section in _IGNORED_FOR_REUSE or not isinstance(values, dict):
            continue
        out[section] = {k: v for k, v in values.items() if f"{section}.{k}" not in _IGNORED_FOR_REUSE}
    return out


def finished_summary(cell: Cell) -> dict[str, Any] | None:
    """The cell's summary.json when it exists (the cell is done), else None. A finished cell
    trained with a different config (its config.json) is an error, not silently reused."""
    path = cell.directory / "summary.json"
    if not path.exists():
        return None
    written = cell.directory / "config.json"
    if written.exists():
        old, new = _relevant(json.loads(written.read_text())), _relevant(cell.config.to_dict())
        if old != new:
            diff = sorted(f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k])
            raise ConfigError(
                f"{cell.directory} was trained with a different config "
                f"({', '.join(diff[:8]) + (', ...' if len(diff) > 8 else '') or 'sections differ'}); "
                "use a new --output-dir, or delete that cell to retrain it"
            )
    return json.loads(path.read_text())


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_cells(
    cells: list[Cell], train: Callable[[Cell], dict[str, Any]], log: Callable[..., None] = print
) -> dict[tuple[str, int], dict[str, Any]]:
    """Train the cells that have no summary.json yet, printing progress; returns every cell's summary."""
    started = time.monotonic()
    todo = sum(finished_summary(c) is None for c in cells)
    trained, train_seconds = 0, 0.0
    summaries = {}
    log(f"bench quality: {len(cells)} cells, {len(cells) - todo} already finished, {todo} to train", flush=True)
    for i, cell in enumerate(cells, 1):
        head = f"cell {i}/{len(cells)}  {cell.variant.name}  seed {cell.seed}"
        summary = finished_summary(cell)
        if summary is not None:
            state = "finished earlier (summary.json exists)"
        else:
            left = todo - trained
            eta = _clock(left * train_seconds / trained) if trained else "?"
            log(f"{head}  training  elapsed {_clock(time.monotonic() - started)}  ETA {eta}", flush=True)
            t0 = time.monotonic()
            summary = train(cell)
            train_seconds += time.monotonic() - t0
            trained += 1
            state = f"trained in {_clock(time.monotonic() - t0)}"
        summaries[(cell.variant.name, cell.seed)] = summary
        auc = "  ".join(f"{t}={_num(m.get('auc'), '.4f')}" for t, m in summary["tasks"].items())
        log(f"{head}  {state}  test AUC {auc}  elapsed {_clock(time.monotonic() - started)}", flush=True)
    return summaries


# ---------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------

def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean, or None when a cell lacks the value (a summary written before it was recorded)."""
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def paired_test(reference: list[float], method: list[float]) -> dict[str, Any]:
    """Two-sided paired t-test of NE(reference) - NE(method) over seeds (scipy.stats.ttest_rel);
    positive t: the method's NE is lower (better). p is None with fewer than 2 seeds, or when
    the differences have no spread (t undefined)."""
    from scipy import stats

    d = [a - b for a, b in zip(reference, method)]
    out: dict[str, Any] = {"n": len(d), "mean_diff": statistics.fmean(d) if d else None,
                           "sd_diff": _std(d), "t": None, "p": None}
    if len(d) < 2:
        out["note"] = "fewer than 2 seeds: no test"
        return out
    if all(x == d[0] for x in d):
        out["note"] = "identical differences on every seed: t undefined"
        return out
    res = stats.ttest_rel(reference, method)
    out["t"], out["p"] = _finite(float(res.statistic)), _finite(float(res.pvalue))
    return out


def aggregate(variants: list[MethodVariant], seeds: list[int],
              summaries: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    tasks = list(summaries[(REFERENCE, seeds[0])]["tasks"])
    per_seed_ne: dict[str, dict[str, list[float]]] = {}
    out: dict[str, Any] = {}
    for v in variants:
        cells = [summaries[(v.name, s)] for s in seeds]
        for s, c in zip(seeds, cells):
            if list(c["tasks"]) != tasks:
                raise ConfigError(f"cell {v.name} seed {s} has tasks {list(c['tasks'])}, expected {tasks}")
        ne = {t: [c["tasks"][t]["ne"] for c in cells] for t in tasks}
        auc = {t: [c["tasks"][t]["auc"] for c in cells] for t in tasks}
        calibration = {t: [c["tasks"][t].get("calibration") for c in cells] for t in tasks}
        per_seed_ne[v.name] = ne
        out[v.name] = {
            "method": v.method,
            "options": v.options,
            "cells_subdir": f"cells/{v.dirname}",
            "tasks": {t: {"auc_mean": statistics.fmean(auc[t]), "auc_std": _std(auc[t]),
                          "ne_mean": statistics.fmean(ne[t]), "ne_std": _std(ne[t]),
                          "calibration_mean": _mean_or_none(calibration[t])} for t in tasks},
            "cells": [{"seed": s, "tasks": {t: {"auc": c["tasks"][t]["auc"], "ne": c["tasks"][t]["ne"]}
                                            for t in tasks}} for s, c in zip(seeds, cells)],
        }
    ref = out[REFERENCE]
    ref_avg_ne = [statistics.fmean(per_seed_ne[REFERENCE][t][i] for t in tasks) for i in range(len(seeds))]
    for v in variants:
        row = out[v.name]
        for t in tasks:
            eq = ref["tasks"][t]["ne_mean"]
            row["tasks"][t]["ne_gain_pct"] = 100.0 * (eq - row["tasks"][t]["ne_mean"]) / eq
            if v.name != REFERENCE:
                test = paired_test(per_seed_ne[REFERENCE][t], per_seed_ne[v.name][t])
                row["tasks"][t]["ne_t"], row["tasks"][t]["ne_p"] = test["t"], test["p"]
            else:
                row["tasks"][t]["ne_t"] = row["tasks"][t]["ne_p"] = None
        row["avg_ne_gain_pct"] = statistics.fmean(row["tasks"][t]["ne_gain_pct"] for t in tasks)
        if v.name == REFERENCE:
            row["test"] = {"n": len(seeds), "t": None, "p": None, "note": "reference"}
        else:
            avg_ne = [statistics.fmean(per_seed_ne[v.name][t][i] for t in tasks) for i in range(len(seeds))]
            row["test"] = paired_test(ref_avg_ne, avg_ne)
    return {"tasks": tasks, "variants": out}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_tables(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [
        f"Test-split quality over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), model {report['model']}, "
        f"level {report['level']}, global batch {report['global_batch_size']}, "
        f"{report['steps'] if report['steps'] else 'epochs ' + str(report['epochs'])} "
        f"{'steps' if report['steps'] else ''}".rstrip(),
        "",
        "NE gain = 100 * (NE(equal) - NE(method)) / NE(equal) from the seed means (positive is better); "
        "p: two-sided paired t-test against equal weights over seeds (paired by seed); calibration: sum of "
        "predictions / sum of labels on the test split, mean over seeds (1 is calibrated)"
        + ("." if len(seeds) >= 2 else "; with fewer than 2 seeds there is no test (p = n/a)."),
        "",
        "| method | task | AUC (mean ± std) | NE (mean ± std) | NE gain vs equal | p (NE, paired) | calibration |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["variants"].items():
        for task, m in row["tasks"].items():
            p = "reference" if name == REFERENCE else _num(m["ne_p"], ".3g")
            lines.append(f"| {name} | {task} | {_pm(m['auc_mean'], m['auc_std'])} | {_pm(m['ne_mean'], m['ne_std'])} "
                         f"| {_num(m['ne_gain_pct'], '+.2f')}% | {p} | {_num(m.get('calibration_mean'), '.4f')} |")
    lines += [
        "",
        "Average over tasks; the test pairs each seed's average-over-tasks NE with equal weights' on the same seed.",
        "",
        "| method | avg NE gain vs equal | t | p | seeds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["variants"].items():
        test = row["test"]
        t, p = ("—", "reference") if name == REFERENCE else (_num(test["t"], ".3f"), _num(test["p"], ".3g"))
        lines.append(f"| {name} | {_num(row['avg_ne_gain_pct'], '+.2f')}% | {t} | {p} | {test['n']} |")
    floor = report.get("noise_floor")
    if floor:
        lines += ["", *noise_floor_lines(report, floor)]
    return "\n".join(lines)


def noise_floor_lines(report: dict[str, Any], floor: str) -> list[str]:
    """The noise-floor paragraph: the floor's gain per task, and per method the tasks whose gain
    is no larger in size than the floor's (indistinguishable from rounding at these seeds)."""
    tasks, variants = report["tasks"], report["variants"]
    floor_gain = {t: variants[floor]["tasks"][t]["ne_gain_pct"] for t in tasks}
    lines = [
        f"Noise floor: {floor} is equal weights with the balanced gradient halved, the same training in exact "
        "arithmetic (Adam and Adagrad ignore a constant scale); it differs from equal only by float rounding, "
        "amplified by training. Its NE gains, "
        + ", ".join(f"{t} {_num(floor_gain[t], '+.2f')}%" for t in tasks)
        + ", are what these seeds cannot tell from zero; one floor is itself a single sample of that noise.",
        "",
        "| method | tasks within the floor (abs(gain) <= abs(floor's)) |",
        "| --- | --- |",
    ]
    for name, row in variants.items():
        if name in (REFERENCE, floor):
            continue
        within = [t for t in tasks if row["tasks"][t]["ne_gain_pct"] is not None and floor_gain[t] is not None
                  and abs(row["tasks"][t]["ne_gain_pct"]) <= abs(floor_gain[t])]
        lines.append(f"| {name} | {', '.join(within) or '(none)'} |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names = report["tasks"], list(report["variants"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.9 * len(names) + 1.5) * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        means = [report["variants"][n]["tasks"][task]["auc_mean"] or 0.0 for n in names]
        stds = [report["variants"][n]["tasks"][task]["auc_std"] or 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3,
               color=["0.6" if n == REFERENCE else "C0" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        lo = min(m - s for m, s in zip(means, stds))
        hi = max(m + s for m, s in zip(means, stds))
        pad = max(0.01, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
        ax.set_title(f"{task}: test AUC (mean ± std, {len(report['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def json_safe(value: Any) -> Any:
    """NaN/inf (e.g. AUC of a task without positives) become null: quality.json stays strict JSON."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], output_dir: Path) -> None:
    report = json_safe(report)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "quality.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (output_dir / "quality.md").write_text(format_tables(report) + "\n")
    plot(report, output_dir / "quality.png")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def run_quality(args: Any, log: Callable[..., None] = print) -> int:
    """`recbalance bench quality`: validate everything, train the missing cells, write the report."""
    from trainer.run.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    for flag, value, minimum in (("--seeds", args.seeds, 1), ("--nproc-per-node", args.nproc_per_node, 1),
                                 ("--seed-base", args.seed_base, 0), ("--max-restarts", args.max_restarts, 0)):
        if value < minimum:
            raise ConfigError(f"{flag}: {value} is not allowed; expected an integer >= {minimum}")
    variants = parse_methods(args.methods)
    floor = noise_floor_variant(cfg) if getattr(args, "noise_floor", False) else None
    if floor is not None and all(v.name != floor.name for v in variants):
        variants.insert(1, floor)
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    out = Path(args.output_dir)
    cells = plan_cells(cfg, variants, seeds, out)
    for v in variants:  # every variant's config, balancer options and batch split, before any training
        first = next(c for c in cells if c.variant is v)
        try:
            preflight(first.config, world_size=args.nproc_per_node)
        except ConfigError as err:
            raise ConfigError(f"--methods {v.name!r}: {err}") from None

    def train(cell: Cell) -> dict[str, Any]:
        from trainer.run.launcher import launch_local

        return launch_local(cell.config.to_dict(), str(cell.directory), args.nproc_per_node, args.max_restarts)

    summaries = run_cells(cells, train, log)
    report = {
        "reference": REFERENCE,
        "eval_split": EVAL_SPLIT,
        "seeds": seeds,
        "nproc_per_node": args.nproc_per_node,
        "config": str(args.config),
        "overrides": list(args.overrides),
        "methods": args.methods,
        "model": cfg.model.kind,
        "level": cfg.balance.level,
        "data_path": cfg.data.path,
        "global_batch_size": cfg.data.global_batch_size,
        "steps": cfg.train.steps,
        "epochs": cfg.train.epochs,
        "cells_dir": str(out / "cells"),
        "noise_floor": floor.name if floor is not None else None,
        **aggregate(variants, seeds, summaries),
    }
    write_report(report, out)
    log("\n" + format_tables(json_safe(report)), flush=True)
    log(f"\nwritten: {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}", flush=True)
    return 0
