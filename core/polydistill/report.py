"""Tables, plots and an HTML page for an ablation study directory.

A study directory holds ``study.json`` (the plan) and ``runs/<cell>/seed-<seed>/result.json`` (one per
finished run). `write_report` aggregates one metric per cell over seeds, compares each cell with the
baseline cell by a paired test over the seeds both finished, and writes report.md, report.html,
cells.csv, runs.csv, per_language.png, curves.png and deltas.png.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from polydistill.checkpoint import write_atomic
from polydistill.errors import ConfigError
from polydistill.stats import PairedTest, paired_test

NAN = float("nan")
DASH = "–"
PLOT_TITLES = {"per_language.png": "Per-language metric", "curves.png": "Training curves",
               "deltas.png": "Δ vs baseline"}
NOTE = ("Values are mean ± sample std over the seeds that finished ok; wall s is their mean wall time. Δ is the mean "
        "paired difference of the average metric against the baseline over the seeds both cells finished; "
        "* marks p < 0.05.")


# ---------------------------------------------------------------- loading


@dataclass
class Study:
    """A study plan (study.json) and the run records read from runs/*/seed-*/result.json."""

    dir: Path
    plan: dict[str, Any]
    runs: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def read_study_dir(study_dir: str | Path) -> Study:
    """Read the plan and every readable result.json; unreadable ones are skipped with a warning."""
    root = Path(study_dir)
    if not root.is_dir():
        raise ConfigError(f"study directory not found: {root}")
    plan_path = root / "study.json"
    if not plan_path.is_file():
        raise ConfigError(f"{root}: not a study directory (no study.json)")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{plan_path}: not valid JSON: {exc}") from None
    cells = plan.get("cells") if isinstance(plan, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "name" in c for c in cells):
        raise ConfigError(f"{plan_path}: expected an object whose 'cells' is a list of objects with a name")
    study = Study(root, plan, [])
    for path in sorted(root.glob("runs/*/seed-*/result.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            study.warnings.append(f"skipped unreadable {path}: {exc}")
            continue
        if not isinstance(record, dict):
            study.warnings.append(f"skipped {path}: not a JSON object")
            continue
        # The directory names the run when the record itself does not.
        record.setdefault("slug", path.parent.parent.name)
        record.setdefault("seed", path.parent.name.removeprefix("seed-"))
        record["seed"] = _seed(record["seed"])
        study.runs.append(record)
    return study


def _seed(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _seed_key(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _values(run: dict[str, Any], metric: str) -> dict[str, float]:
    """The run's metric keyed by "average" and by language; absent ones left out."""
    metrics = run.get("metrics") or {}
    out: dict[str, float] = {}
    if _number(v := (metrics.get("average") or {}).get(metric)):
        out["average"] = float(v)
    for lang, vals in (metrics.get("per_language") or {}).items():
        if isinstance(vals, dict) and _number(v := vals.get(metric)):
            out[lang] = float(v)
    return out


def _available_metrics(runs: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for run in runs:
        metrics = run.get("metrics") or {}
        names.update(k for k, v in (metrics.get("average") or {}).items() if _number(v))
        for vals in (metrics.get("per_language") or {}).values():
            if isinstance(vals, dict):
                names.update(k for k, v in vals.items() if _number(v))
    return names


def _error_text(run: dict[str, Any]) -> str:
    error = run.get("error") or {}
    lines = str(error.get("message") or "").strip().splitlines()
    kind = error.get("type") or f"status {run.get('status')!r}"
    return f"{kind}: {lines[0]}" if lines else str(kind)


# ---------------------------------------------------------------- aggregation


@dataclass
class CellSummary:
    """One cell's metric over its seeds, and its paired comparison with the baseline cell."""

    name: str
    slug: str
    levels: dict[str, Any]
    n_planned: int
    n_missing: int
    ok_seeds: list[Any]
    failures: list[tuple[Any, str]]  # (seed, "ErrorType: first line of message")
    mean: dict[str, float]  # keyed by "average" and by language
    std: dict[str, float]  # sample std (ddof=1); NaN with one seed
    wall_time_mean: float
    seed_values: dict[Any, dict[str, float]] = field(default_factory=dict, repr=False)  # ok seeds' values
    is_baseline: bool = False
    #: (seed, why): trials of a search (`polydistill tune`) that its pruner stopped early.
    pruned: list[tuple[Any, str]] = field(default_factory=list)
    comparison: PairedTest | None = None
    lang_delta: dict[str, float] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return len(self.ok_seeds)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def delta(self) -> float:
        return self.comparison.mean if self.comparison else NAN

    @property
    def ci(self) -> tuple[float, float]:
        return self.comparison.ci if self.comparison else (NAN, NAN)

    @property
    def p_value(self) -> float:
        return self.comparison.p_value if self.comparison else NAN


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return NAN, NAN
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else NAN)


def _group_runs(study: Study, warnings: list[str]) -> dict[str, dict[Any, dict[str, Any]]]:
    """Run records by planned cell name, then by seed, seeds in order."""
    cells = study.plan.get("cells") or []
    by_name = {c["name"]: c for c in cells}
    by_slug = {c.get("slug"): c for c in cells}
    seeds = {_seed(s) for s in study.plan.get("seeds") or []}
    grouped: dict[str, dict[Any, dict[str, Any]]] = {c["name"]: {} for c in cells}
    for run in sorted(study.runs, key=lambda r: _seed_key(r["seed"])):
        cell = by_name.get(run.get("cell")) or by_slug.get(run.get("slug"))
        if cell is None or (seeds and run["seed"] not in seeds):  # left over from an earlier version of the study
            warnings.append(f"run {run.get('cell') or run.get('slug')!r} seed {run['seed']} is not in the plan; "
                            "left out of the tables")
            continue
        if run["seed"] in grouped[cell["name"]]:
            warnings.append(f"two results for {cell['name']!r} seed {run['seed']}; using the last one")
        grouped[cell["name"]][run["seed"]] = run
    return grouped


def _summarise(plan: dict[str, Any], grouped: dict[str, dict[Any, dict[str, Any]]], metric: str, test: str,
               warnings: list[str]) -> list[CellSummary]:
    seeds = [_seed(s) for s in plan.get("seeds") or []]
    summaries = []
    for cell in plan.get("cells") or []:
        runs = grouped[cell["name"]]
        ok = {s: _values(r, metric) for s, r in runs.items() if r.get("status") == "ok"}
        keys = {k for v in ok.values() for k in v}
        stats = {k: _mean_std([v[k] for v in ok.values() if k in v]) for k in keys}
        walls = [float(runs[s]["wall_time_s"]) for s in ok if _number(runs[s].get("wall_time_s"))]
        summaries.append(CellSummary(
            name=cell["name"], slug=cell.get("slug", ""), levels=dict(cell.get("levels") or {}),
            n_planned=len(seeds), n_missing=sum(s not in runs for s in seeds), ok_seeds=list(ok),
            failures=[(s, _error_text(r)) for s, r in runs.items() if r.get("status") not in ("ok", "pruned")],
            pruned=[(s, _error_text(r).removeprefix("pruned: ")) for s, r in runs.items() if r.get("status") == "pruned"],
            mean={k: m for k, (m, _) in stats.items()}, std={k: sd for k, (_, sd) in stats.items()},
            wall_time_mean=float(np.mean(walls)) if walls else NAN, seed_values=ok,
        ))
    _compare_with_baseline(summaries, plan.get("baseline"), test, warnings)
    return summaries


def _compare_with_baseline(cells: list[CellSummary], baseline: str | None, test: str, warnings: list[str]) -> None:
    base = next((c for c in cells if baseline in (c.name, c.slug)), None)
    if base is None:
        warnings.append(f"baseline {baseline!r} is not a cell of the plan; no deltas" if baseline
                        else "study.json names no baseline; no deltas")
        return
    base.is_baseline = True
    base_values = base.seed_values
    for cell in cells:
        if cell is base:
            continue
        values = cell.seed_values
        common = [s for s in values if s in base_values]
        cell.comparison = paired_test([values[s]["average"] - base_values[s]["average"] for s in common
                                       if "average" in values[s] and "average" in base_values[s]], test)
        for lang in {k for s in common for k in values[s]} - {"average"}:
            diffs = [values[s][lang] - base_values[s][lang] for s in common
                     if lang in values[s] and lang in base_values[s]]
            cell.lang_delta[lang] = float(np.mean(diffs)) if diffs else NAN


def _languages(cells: list[CellSummary]) -> list[str]:
    langs = {k for c in cells for k in c.mean} - {"average"}
    return sorted(langs, key=lambda lang: (lang != "en", lang))


# ---------------------------------------------------------------- formatting


def _fmt(x: float, spec: str = ".3f") -> str:
    return DASH if x is None or math.isnan(x) else format(x, spec)


def _fmt_p(p: float) -> str:
    return DASH if math.isnan(p) else f"{p:.3g}" + ("*" if p < 0.05 else "")


def _table(cells: list[CellSummary], langs: list[str], test: str) -> tuple[list[str], list[list[str]]]:
    """Header and text rows shared by report.md and report.html."""
    header = ["cell", *langs, "average", "Δ vs baseline", "p", "seeds", "wall s"]
    rows = []
    for c in cells:
        stats = [DASH if math.isnan(c.mean.get(k, NAN)) else f"{c.mean[k]:.3f} ± {_fmt(c.std[k])}"
                 for k in [*langs, "average"]]
        delta, p = ("baseline", DASH) if c.is_baseline else (_fmt(c.delta, "+.3f"), _fmt_p(c.p_value))
        if test == "t" and not math.isnan(c.ci[0]):
            delta += f" [{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]"
        if c.comparison and c.comparison.note:
            p += f" ({c.comparison.note})"
        rows.append([c.name, *stats, delta, p, f"{c.n_ok}/{c.n_planned}", _fmt(c.wall_time_mean, ".0f")])
    return header, rows


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows])
    return buf.getvalue()


def _cells_csv(cells: list[CellSummary], axes: list[str], langs: list[str]) -> str:
    keys = ["average", *langs]
    header = ["cell", *axes, "n_ok", "n_failed", "n_planned", *[f"{k}_{s}" for k in keys for s in ("mean", "std")],
              "delta_mean", "delta_ci_low", "delta_ci_high", "p_value", *[f"{lang}_delta" for lang in langs],
              "wall_time_mean"]
    rows = [[c.name, *[c.levels.get(a, "") for a in axes], c.n_ok, c.n_failed, c.n_planned,
             *[v for k in keys for v in (c.mean.get(k, NAN), c.std.get(k, NAN))],
             c.delta, *c.ci, c.p_value, *[c.lang_delta.get(lang, NAN) for lang in langs], c.wall_time_mean]
            for c in cells]
    return _csv(header, rows)


def _runs_csv(runs: list[dict[str, Any]], grouped: dict[str, dict[Any, dict[str, Any]]], metric: str,
              langs: list[str]) -> str:
    """One row per record: planned cells in plan order first, then any the plan does not know."""
    named = [(name, r) for name, by_seed in grouped.items() for r in by_seed.values()]
    placed = {id(r) for _, r in named}
    named += [(r.get("cell") or r.get("slug"), r) for r in runs if id(r) not in placed]
    rows = []
    for name, r in named:
        values = _values(r, metric)
        rows.append([name, r["seed"], r.get("status"),
                     *[values.get(k, NAN) for k in ["average", *langs]],
                     float(r["wall_time_s"]) if _number(r.get("wall_time_s")) else NAN,
                     "" if r.get("status") == "ok" else _error_text(r)])
    return _csv(["cell", "seed", "status", "average", *langs, "wall_time_s", "error"], rows)


# ---------------------------------------------------------------- plots


#: What a metric's short name means on a plot's axis.
METRIC_LABELS = {"mean": "retrieval accuracy (both directions)", "macro_f1": "macro-F1", "exact_match": "exact match",
                 "next_token_accuracy": "next-token accuracy"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def plot_run(metrics: dict[str, Any], metric: str, title: str) -> bytes:
    """One run's ``metric`` per language and on average, as bars labelled with their values (PNG)."""
    per = metrics.get("per_language") or {}
    langs = sorted(l for l in per if metric in per[l])
    values = [float(per[l][metric]) for l in langs] + [float((metrics.get("average") or {}).get(metric, NAN))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(values) + 1.5), 3.5), dpi=120)
    bars = ax.bar(range(len(values)), values, color=["C0"] * len(langs) + ["C1"])
    ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(values)), langs + ["average"], rotation=45 if len(values) > 12 else 0)
    finite = [v for v in values if not math.isnan(v)]
    if finite and 0 <= min(finite) and max(finite) <= 1:
        ax.set_ylim(0, 1.05)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def _plot_per_language(cells: list[CellSummary], langs: list[str], metric: str, title: str) -> bytes:
    plt = _pyplot()
    groups, colors = [*langs, "average"], _colors(len(cells))
    width = 0.8 / len(cells)
    fig, ax = plt.subplots(figsize=(max(8.0, 2.0 + 0.25 * len(cells) * len(groups)), 4.5), dpi=120)
    for k, c in enumerate(cells):
        xs = np.arange(len(groups)) + (k - (len(cells) - 1) / 2) * width
        ax.bar(xs, [c.mean.get(g, NAN) for g in groups], width, yerr=[c.std.get(g, NAN) for g in groups],
               capsize=3, color=colors[k], label=c.name)
    base = next((c for c in cells if c.is_baseline), None)
    if base is not None and not math.isnan(base.mean.get("average", NAN)):
        ax.axhline(base.mean["average"], color="black", linestyle="--", linewidth=1,
                   label=f"baseline average ({base.name})")
    ax.set_xticks(range(len(groups)), groups)
    spread = any(len(c.ok_seeds) > 1 for c in cells)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (" (mean ± std over seeds)" if spread else ""))
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(cells) + 1), fontsize=8, frameon=False)
    return _png(fig)


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of `key` against step, at the steps every seed that logged it has."""
    per_seed = []
    for run in runs:
        points = {int(row["step"]): float(row[key]) for row in run.get("history") or []
                  if isinstance(row, dict) and _number(row.get(key)) and _number(row.get("step"))}
        if points:
            per_seed.append(points)
    if not per_seed:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not steps:
        return None
    values = np.array([[p[s] for s in steps] for p in per_seed])
    std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.full(len(steps), NAN)
    return np.array(steps), values.mean(axis=0), std


def _curve_panels(cells: list[CellSummary], grouped: dict[str, dict[Any, dict[str, Any]]],
                  metric: str) -> dict[str, list[tuple[str, Any, tuple]]]:
    """Training loss, and the eval metric when some cell was evaluated at least twice."""
    panels = {}
    for key, label, min_points in (("loss", "loss", 1), (f"eval/{metric}", f"eval {metric}", 2)):
        lines = []
        for c, color in zip(cells, _colors(len(cells))):
            runs = [r for r in grouped[c.name].values() if r.get("status") == "ok"]
            if (curve := _curve(runs, key)) is not None:
                lines.append((c.name, color, curve))
        if any(len(curve[0]) >= min_points for _, _, curve in lines):
            panels[label] = lines
    return panels


def _plot_curves(curves: dict[str, list[tuple[str, Any, tuple]]], title: str) -> bytes:
    """One panel per entry of `curves`: panel title -> [(cell name, colour, (steps, mean, std))]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6.0 * len(curves), 4.0), dpi=120, squeeze=False)
    for ax, (label, lines) in zip(axes[0], curves.items()):
        for name, color, (steps, mean, std) in lines:
            ax.plot(steps, mean, color=color, label=name, marker="o" if len(steps) < 3 else None)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        low = np.concatenate([m - np.nan_to_num(s) for _, _, (_, m, s) in lines])
        high = np.concatenate([m for _, _, (_, m, _) in lines])
        if label == "loss" and low.min() > 0 and high.max() > 10 * low.min():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(title)
    handles = {}  # a cell may appear in one panel only
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(3, len(handles)), fontsize=8, frameon=False)
    return _png(fig)


def _plot_deltas(cells: list[CellSummary], metric: str) -> bytes:
    from matplotlib.patches import Patch

    plt = _pyplot()
    base = next(c for c in cells if c.is_baseline)
    rows = [c for c in cells if not c.is_baseline]
    fig, ax = plt.subplots(figsize=(8.0, max(2.5, 1.5 + 0.4 * len(rows))), dpi=120)
    deltas = np.array([c.delta for c in rows])
    # only what the seeds support: an interval and a test need two paired seeds or more
    tested = [c for c in rows if c.comparison is not None and not math.isnan(c.p_value)]
    label = METRIC_LABELS.get(metric, metric)
    if tested:
        err = np.array([[c.delta - c.ci[0] for c in rows], [c.ci[1] - c.delta for c in rows]])
        err = np.where(np.isnan(err), 0.0, err)
        colors = ["tab:orange" if c.p_value < 0.05 else "tab:blue" for c in rows]
        ax.barh(np.arange(len(rows)), deltas, xerr=err, capsize=3, color=colors)
        ax.set_xlabel(f"change in average {label} vs baseline ({base.name}), with 95% t interval over seeds")
        ax.legend(handles=[Patch(color="tab:orange", label="p < 0.05"), Patch(color="tab:blue", label="p ≥ 0.05")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.15 - 0.6 / len(rows)), ncol=2, fontsize=8, frameon=False)
    else:
        ax.barh(np.arange(len(rows)), deltas, color="tab:blue")
        ax.set_xlabel(f"change in average {label} vs baseline ({base.name}); one seed: no interval or test")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), [c.name for c in rows])
    ax.invert_yaxis()  # plan order top to bottom
    return _png(fig)


# ---------------------------------------------------------------- pages


def _markdown(title: str, summary: str, header: list[str], rows: list[list[str]], failures: list[str],
              warnings: list[str], plots: list[str], none_ok: bool) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# {title}", "", summary, ""]
    if none_ok:
        lines += ["No run has finished ok yet.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(t) for t in row) + " |" for row in rows]
    lines += ["", NOTE, ""]
    for heading, items in (("Failures", failures), ("Warnings", warnings)):
        if items:
            lines += [f"## {heading}", "", *[f"- {item}" for item in items], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{PLOT_TITLES[name]}]({name})\n" for name in plots]]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.baseline{font-weight:bold}
img{max-width:100%;display:block;margin:1em 0}.note{color:#555;font-size:.9em}"""


def _html(title: str, summary: str, header: list[str], rows: list[list[str]], cells: list[CellSummary],
          failures: list[str], warnings: list[str], images: dict[str, bytes], none_ok: bool) -> str:
    e = html.escape
    parts = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>',
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(summary.replace('**', ''))}</p>"]
    if none_ok:
        parts.append("<p><strong>No run has finished ok yet.</strong></p>")
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for c, row in zip(cells, rows):
        tr = '<tr class="baseline">' if c.is_baseline else "<tr>"
        parts.append(tr + "".join(f"<td>{e(t)}</td>" for t in row) + "</tr>")
    parts.append(f'</tbody></table><p class="note">{e(NOTE)}</p>')
    for heading, items in (("Failures", failures), ("Warnings", warnings)):
        if items:
            parts.append(f"<h2>{heading}</h2><ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>")
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<h2>{e(PLOT_TITLES[name])}</h2><img alt="{e(name)}" src="data:image/png;base64,{encoded}">')
    return "\n".join(parts) + "\n</body></html>\n"


def _write(path: Path, data: str | bytes) -> Path:
    write_atomic(path, data)  # readers never see a half-written report
    return path


# ---------------------------------------------------------------- entry point


@dataclass
class Report:
    """What `write_report` wrote and the numbers behind it."""

    out_dir: Path
    files: list[Path]
    cells: list[CellSummary]
    warnings: list[str]
    metric: str


def write_report(study_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
                 test: Literal["t", "permutation"] = "t") -> Report:
    """Summarise a (possibly unfinished) study directory as tables, plots and an HTML page in out_dir."""
    if test not in ("t", "permutation"):
        raise ConfigError(f"test must be 't' or 'permutation', not {test!r}")
    study = read_study_dir(study_dir)
    warnings = list(study.warnings)
    plan = study.plan
    metric = metric or plan.get("metric")
    if not metric:
        raise ConfigError(f"{study.dir / 'study.json'}: names no metric; pass one")
    available = _available_metrics(study.runs)
    if available and metric not in available:
        raise ConfigError(f"metric {metric!r} is not in any run's metrics under {study.dir / 'runs'}; "
                          f"available: {', '.join(sorted(available))}")

    grouped = _group_runs(study, warnings)
    cells = _summarise(plan, grouped, metric, test, warnings)
    langs = _languages(cells)
    name = plan.get("name") or study.dir.name
    seeds = plan.get("seeds") or []
    n_ok = sum(c.n_ok for c in cells)
    n_failed = sum(c.n_failed for c in cells)
    n_pruned = sum(len(c.pruned) for c in cells)
    n_missing = sum(c.n_missing for c in cells)
    test_text = ("paired t-test (two-sided), Δ with 95% CI" if test == "t"
                 else "exact paired sign-flip test (two-sided)")
    summary = (f"Metric: **{metric}** · seeds: {', '.join(map(str, seeds)) or DASH} · test: {test_text} · "
               f"baseline: **{plan.get('baseline') or DASH}** · runs: {n_ok} ok, "
               + (f"{n_pruned} pruned, " if n_pruned else "") + f"{n_failed} failed, "
               f"{n_missing} missing of {len(cells) * len(seeds)} planned")

    images: dict[str, bytes] = {}
    if n_ok == 0:
        warnings.append("no run has finished ok yet; plots skipped")
    else:
        images["per_language.png"] = _plot_per_language(cells, langs, metric, name)
        if panels := _curve_panels(cells, grouped, metric):
            images["curves.png"] = _plot_curves(panels, name)
        else:
            warnings.append("no training history in any ok run; curves.png skipped")
        if any(not c.is_baseline and not math.isnan(c.delta) for c in cells):
            images["deltas.png"] = _plot_deltas(cells, metric)
        else:
            warnings.append("no cell has a delta against the baseline yet; deltas.png skipped")

    out = Path(out_dir) if out_dir is not None else study.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _table(cells, langs, test)
    failures = [f"{c.name}, seed {seed}: {error}" for c in cells for seed, error in c.failures]
    # a search's pruned trials are listed with the warnings' notes, not as failures
    warnings += [f"{c.name}: {why}" for c in cells for _, why in c.pruned]
    axes = [a["name"] for a in plan.get("axes") or []]
    files = [_write(out / fname, data) for fname, data in images.items()]
    files += [
        _write(out / "cells.csv", _cells_csv(cells, axes, langs)),
        _write(out / "runs.csv", _runs_csv(study.runs, grouped, metric, langs)),
        _write(out / "report.md", _markdown(f"Study report: {name}", summary, header, rows, failures, warnings,
                                            list(images), n_ok == 0)),
        _write(out / "report.html", _html(f"Study report: {name}", summary, header, rows, cells, failures,
                                          warnings, images, n_ok == 0)),
    ]
    return Report(out, files, cells, warnings, metric)


# ---------------------------------------------------------------- one run


def is_run_dir(path: str | Path) -> bool:
    """A `polydistill train` run directory (config.json and metrics.jsonl), not a study."""
    p = Path(path)
    return (p / "metrics.jsonl").is_file() and (p / "config.json").is_file() and not (p / "study.json").is_file()


def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """One run's curves: each loss term, and each language's evaluation metrics, over the steps (PNG, md, HTML)."""
    from polydistill.api import metrics_table

    root = Path(run_dir)
    rows = []
    for n, line in enumerate((root / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{root / 'metrics.jsonl'}: line {n} is not JSON") from None
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    # a multi-task run prefixes its terms and metrics with the task: a loss plot per task, metrics "<task>/<metric>"
    tasks = {n: t.get("task") for n, t in (config.get("tasks") or {}).items() if t.get("enabled", True)}
    images: dict[str, bytes] = {}
    plt = _pyplot()
    for prefix in [f"{n}/" for n in tasks] or [""]:
        terms = sorted({k for r in train for k in r if k == f"{prefix}loss" or k.startswith((f"{prefix}loss/", f"{prefix}reg/"))})
        terms = terms or (["loss"] if prefix else [])
        if not train or not terms:
            continue
        fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
        for k in terms:
            pts = [(r["step"], r[k]) for r in train if k in r]
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=k, linewidth=2 if k.endswith("loss") else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("value (mean since the previous record)")
        ax.set_title(f"{root.name}: {prefix[:-1] + ' ' if prefix else ''}loss terms")
        ax.legend(fontsize=7)
        images[f"losses_{prefix[:-1]}.png" if prefix else "losses.png"] = _png(fig)
    depth = 2 if tasks else 1  # slashes in an average's key: eval/<metric> or eval/<task>/<metric>
    metric_keys = sorted({k[5:] for r in evals for k in r if k.startswith("eval/") and not k.startswith("eval/plugins/")
                          and k.count("/") == depth and (not tasks or k.split("/")[1] in tasks)})
    for metric in metric_keys:
        langs = sorted({k.split("/")[1] for r in evals for k in r if k.startswith("eval/") and k.endswith(f"/{metric}")
                        and k.count("/") == depth + 1 and not k.startswith("eval/plugins/")})
        fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
        for lang, color in zip(langs, _colors(len(langs))):
            pts = [(r["step"], r[f"eval/{lang}/{metric}"]) for r in evals if f"eval/{lang}/{metric}" in r]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", markersize=3, color=color, label=lang)
        avg = [(r["step"], r[f"eval/{metric}"]) for r in evals if f"eval/{metric}" in r]
        ax.plot([s for s, _ in avg], [v for _, v in avg], color="black", linestyle="--", label="average")
        task, _, name = metric.rpartition("/")
        label = (f"{task}: " if task else "") + METRIC_LABELS.get(name, name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{root.name}: {label} per language")
        ax.legend(fontsize=7, ncol=2)
        images[f"eval_{metric.replace('/', '_')}.png"] = _png(fig)
    final = json.loads((root / "metrics.json").read_text(encoding="utf-8")) if (root / "metrics.json").is_file() else {}
    title = f"Run report: {root.name}"
    steps = max((r["step"] for r in rows), default=0)
    if tasks:
        summary = (f"multi-task: {', '.join(f'{n} (`{t}`)' for n, t in tasks.items())}; {steps} steps logged, "
                   f"{len(evals)} evaluations")
        tables = [(f"{n} ({tasks.get(n)})", metrics_table(m)) for n, m in final.get("tasks", {}).items() if m.get("per_language")]
    else:
        summary = f"task `{config.get('task')}`, mode `{config.get('mode')}`; {steps} steps logged, {len(evals)} evaluations"
        tables = [("", metrics_table(final))] if final.get("per_language") else []
    warnings = [] if evals else ["no evaluation rows (data.eval empty): no per-language curves"]
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", summary, ""] + (["## Final evaluation", ""] if tables else [])
    for heading, table in tables:
        md += ([f"### {heading}", ""] if heading else []) + [*table, ""]
    md += [f"- {w}" for w in warnings] + ([""] if warnings else [])
    md += [f"![{name}]({name})\n" for name in images]
    e = html.escape
    page = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title>',
            f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(summary.replace('`', ''))}</p>"]
    cells = lambda line: [c.strip().replace("**", "") for c in line.strip("|").split("|")]  # noqa: E731
    for heading, (head, _, *body) in tables:
        page += [f"<h2>{e(heading)}</h2>"] if heading else []
        page.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cells(head)) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells(row)) + "</tr>" for row in body)
                    + "</tbody></table>")
    page += [f"<p>{e(w)}</p>" for w in warnings]
    for name, data in images.items():
        page.append(f'<img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')
    files = [_write(out / name, data) for name, data in images.items()]
    files += [_write(out / "report.md", "\n".join(md).rstrip() + "\n"), _write(out / "report.html", "\n".join(page) + "\n</body></html>\n")]
    return Report(out, files, [], warnings, metric_keys[0] if metric_keys else "")
