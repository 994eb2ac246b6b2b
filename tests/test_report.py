"""polydistill.report on hand-written study directories: statistics, tables, plots, HTML, errors."""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from polydistill.errors import ConfigError
from polydistill.report import read_study_dir, write_report
from polydistill.stats import paired_test, sign_flip_test, t_cdf, t_ppf, t_two_sided_p

BASE = "augment=off, temperature=1"
CELLS = [("off", "1"), ("off", "4"), ("synonym", "1"), ("synonym", "4")]

# (cell index, seed) -> (en, de, average, wall_time_s); a missing key means no result.json.
VALUES = {
    (0, 0): (0.80, 0.60, 0.70, 10.0), (0, 1): (0.82, 0.64, 0.73, 12.0),
    (1, 0): (0.84, 0.66, 0.75, 11.0), (1, 1): (0.86, 0.70, 0.80, 13.0),
    (2, 0): (0.78, 0.62, 0.71, 9.0),  # seed 1 of cell 2 fails
    (3, 0): (0.90, 0.70, 0.80, 20.0),  # seed 1 of cell 3 is missing
}
FAILED = {(2, 1)}


def cell_name(i: int) -> str:
    augment, temperature = CELLS[i]
    return f"augment={augment}, temperature={temperature}"


def slug(i: int) -> str:
    augment, temperature = CELLS[i]
    return f"augment-{augment}_temperature-{temperature}"


def history(avg: float) -> list[dict]:
    return [{"step": 10, "epoch": 0, "elapsed_s": 1.0, "loss": 2.0, "loss/kd": 2.0, "lr": 1e-3},
            {"step": 15, "epoch": 0, "eval/accuracy": avg - 0.1, "eval/de/accuracy": avg - 0.2},
            {"step": 20, "epoch": 1, "elapsed_s": 2.0, "loss": 1.0 + avg, "loss/kd": 1.0, "lr": 1e-3},
            {"step": 30, "epoch": 1, "elapsed_s": 3.0, "loss": 0.5 + avg, "loss/kd": 0.5, "lr": 1e-3},
            {"step": 30, "epoch": 1, "eval/accuracy": avg, "eval/de/accuracy": avg - 0.1}]


def write_study(root: Path, values: dict = VALUES, failed: set = FAILED, baseline: str = BASE) -> Path:
    plan = {
        "name": "demo-ablation", "task": "sequence_classification", "metric": "accuracy", "baseline": baseline,
        "seeds": [0, 1],
        "axes": [{"name": "augment", "levels": ["off", "synonym"]}, {"name": "temperature", "levels": ["1", "4"]}],
        "cells": [{"name": cell_name(i), "slug": slug(i), "levels": dict(zip(("augment", "temperature"), CELLS[i])),
                   "overrides": {}} for i in range(len(CELLS))],
        "polydistill": "0.1.0", "created_at": "2026-11-27T21:00:00+00:00",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(plan), encoding="utf-8")
    for (i, seed), (en, de, avg, wall) in values.items():
        write_result(root, i, seed, {
            "status": "ok", "wall_time_s": wall, "history": history(avg),
            "metrics": {"average": {"accuracy": avg, "macro_f1": avg - 0.05},
                        "per_language": {"en": {"accuracy": en, "macro_f1": en - 0.05},
                                         "de": {"accuracy": de, "macro_f1": de - 0.05}}}})
    for i, seed in failed:
        write_result(root, i, seed, {
            "status": "failed", "wall_time_s": 1.5, "metrics": {}, "history": [],
            "error": {"type": "PluginError", "message": "kd: temperature must be positive\nmore detail",
                      "traceback": "Traceback ..."}})
    return root


def write_result(root: Path, i: int, seed: int, fields: dict) -> Path:
    path = root / "runs" / slug(i) / f"seed-{seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"cell": cell_name(i), "slug": slug(i), "levels": dict(zip(("augment", "temperature"), CELLS[i])),
              "seed": seed, "plugins": {"kd": "0.1.0"}, "config": {}, "fingerprint": "ab12",
              "started_at": "2026-11-27T21:00:00+00:00", "finished_at": "2026-11-27T21:01:00+00:00", **fields}
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("t, df, p", [(2.776, 4, 0.05), (12.706, 1, 0.05), (1.96, 1000, 0.0503), (2.228, 10, 0.05),
                                      (0.0, 3, 1.0), (-2.776, 4, 0.05)])
def test_two_sided_p_textbook_values(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def test_t_cdf_closed_forms():
    for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 1e4):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert t_two_sided_p(math.inf, 5) == 0.0
    assert math.isnan(t_two_sided_p(math.nan, 5))


@pytest.mark.parametrize("q, df, t", [(0.975, 4, 2.7764451), (0.975, 1, 12.7062047), (0.975, 1000, 1.9623391),
                                      (0.95, 10, 1.8124611), (0.025, 4, -2.7764451), (0.5, 7, 0.0)])
def test_t_quantile_textbook_values(q, df, t):
    assert t_ppf(q, df) == pytest.approx(t, abs=1e-6)


def test_t_quantile_inverts_cdf():
    for df in (1, 2, 3, 9, 30, 500):
        for q in (0.001, 0.2, 0.6, 0.975, 0.999999):
            assert t_cdf(t_ppf(q, df), df) == pytest.approx(q, rel=1e-9)
    assert t_ppf(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-10)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(300):
        t, df = rng.uniform(-40, 40), rng.choice([rng.randint(1, 60), rng.uniform(0.5, 500.0), 1e5])
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-14)
        assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-14)
        q = rng.uniform(0.0005, 0.9995)
        assert t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8, abs=1e-10)


def test_sign_flip_test_exact_values():
    assert sign_flip_test([1, 2, 3]) == 0.25  # only (+,+,+) and (-,-,-) reach |sum| 6 of 8
    assert sign_flip_test([1, 2, 3, 4]) == 2 / 16
    assert sign_flip_test([1, -1]) == 1.0
    assert sign_flip_test([0.1, 0.2, -0.3]) == 1.0  # every |sum| ties the observed 0, whatever the rounding
    assert math.isnan(sign_flip_test([]))


def test_paired_test_edge_cases():
    one = paired_test([0.3])
    assert one.mean == 0.3 and math.isnan(one.p_value) and "needs ≥2 paired seeds" in one.note
    assert math.isnan(paired_test([0.3], "permutation").p_value)
    assert math.isnan(paired_test([]).mean)
    same = paired_test([0.05, 0.05, 0.05])
    # Identical non-zero differences: no variance to test against, so no p (not a spurious 0).
    assert math.isnan(same.p_value) and same.note == "zero variance" and same.ci == pytest.approx((0.05, 0.05))
    assert paired_test([0.0, 0.0]).p_value == 1.0
    d = [0.05, 0.07, 0.02, 0.04]
    res = paired_test(d)
    mean, sd = statistics.mean(d), statistics.stdev(d)
    t = mean / (sd / 2)
    assert res.mean == pytest.approx(mean)
    assert res.p_value == pytest.approx(t_two_sided_p(t, 3))
    assert res.ci == pytest.approx((mean - 3.1824463 * sd / 2, mean + 3.1824463 * sd / 2), rel=1e-6)
    assert paired_test(d, "permutation").p_value == 2 / 16


# ---------------------------------------------------------------- reports


def test_report_tables_plots_and_html(tmp_path):
    import matplotlib.image

    study = write_study(tmp_path / "study")
    report = write_report(study)
    out = study / "report"
    assert report.out_dir == out and report.metric == "accuracy"
    names = {p.name for p in report.files}
    assert names == {"report.md", "report.html", "cells.csv", "runs.csv", "per_language.png", "curves.png",
                     "deltas.png"}
    assert all(p.is_file() for p in report.files)
    assert not list(out.glob(".*.tmp"))

    rows = {r["cell"]: r for r in read_csv(out / "cells.csv")}
    assert list(rows) == [cell_name(i) for i in range(4)]  # plan order
    assert list(read_csv(out / "cells.csv")[0])[:6] == ["cell", "augment", "temperature", "n_ok", "n_failed",
                                                        "n_planned"]
    for i, row in enumerate(rows.values()):
        seeds = [VALUES[(i, s)] for s in (0, 1) if (i, s) in VALUES]
        assert (row["augment"], row["temperature"]) == CELLS[i]
        assert int(row["n_ok"]) == len(seeds) and int(row["n_planned"]) == 2
        for k, key in enumerate(("en", "de", "average")):
            vals = [v[k] for v in seeds]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.mean(vals))
            if len(vals) < 2:
                assert row[f"{key}_std"] == ""
            else:
                assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(vals))
        assert float(row["wall_time_mean"]) == pytest.approx(statistics.mean(v[3] for v in seeds))
    assert rows[BASE]["delta_mean"] == rows[BASE]["p_value"] == ""
    assert [rows[cell_name(i)]["n_failed"] for i in range(4)] == ["0", "0", "1", "0"]

    # Cell 1 vs the baseline: differences 0.05 and 0.07 -> t = 6 with 1 df (Cauchy: p = 1 - 2/pi atan 6).
    b = rows[cell_name(1)]
    assert float(b["delta_mean"]) == pytest.approx(0.06)
    assert float(b["p_value"]) == pytest.approx(1 - 2 / math.pi * math.atan(6.0), rel=1e-9)
    half = 12.7062047 * statistics.stdev([0.05, 0.07]) / math.sqrt(2)
    assert float(b["delta_ci_low"]) == pytest.approx(0.06 - half, rel=1e-6)
    assert float(b["delta_ci_high"]) == pytest.approx(0.06 + half, rel=1e-6)
    assert float(b["en_delta"]) == pytest.approx(0.04) and float(b["de_delta"]) == pytest.approx(0.06)
    # Cells 2 and 3 pair with the baseline on seed 0 only: a delta but no p-value.
    for i in (2, 3):
        r = rows[cell_name(i)]
        assert float(r["delta_mean"]) == pytest.approx(VALUES[(i, 0)][2] - 0.70)
        assert r["p_value"] == r["delta_ci_low"] == ""

    runs = read_csv(out / "runs.csv")
    assert len(runs) == len(VALUES) + len(FAILED)
    assert list(runs[0]) == ["cell", "seed", "status", "average", "en", "de", "wall_time_s", "error"]
    assert runs[0] == {"cell": BASE, "seed": "0", "status": "ok", "average": "0.7", "en": "0.8", "de": "0.6",
                       "wall_time_s": "10.0", "error": ""}
    failed = [r for r in runs if r["status"] == "failed"]
    assert failed == [{"cell": cell_name(2), "seed": "1", "status": "failed", "average": "", "en": "", "de": "",
                       "wall_time_s": "1.5", "error": "PluginError: kd: temperature must be positive"}]

    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Study report: demo-ablation\n")
    assert "**accuracy**" in md and "seeds: 0, 1" in md and "paired t-test" in md
    assert "6 ok, 1 failed, 1 missing of 8 planned" in md
    assert "| cell | en | de | average | Δ vs baseline | p | seeds | wall s |" in md
    assert f"| {BASE} | 0.810 ± 0.014 | 0.620 ± 0.028 | 0.715 ± 0.021 | baseline | – | 2/2 | 11 |" in md
    assert "| 0.775 ± 0.035 | +0.060 [-0.067, +0.187] | 0.105 | 2/2 | 12 |" in md
    assert "| 0.710 ± – | +0.010 | – (needs ≥2 paired seeds) | 1/2 | 9 |" in md
    assert "## Failures" in md and f"- {cell_name(2)}, seed 1: PluginError: kd: temperature must be positive" in md
    assert "more detail" not in md
    for png in ("per_language.png", "curves.png", "deltas.png"):
        assert f"]({png})" in md
        image = matplotlib.image.imread(out / png)
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.shape[0] > 200 and image.shape[1] > 400

    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert "<table>" in page and "<th>Δ vs baseline</th>" in page
    assert f"<td>{BASE}</td>" in page and "<td>+0.060 [-0.067, +0.187]</td>" in page
    assert "PluginError: kd: temperature must be positive" in page
    assert "<script" not in page

    cell1 = report.cells[1]
    assert cell1.name == cell_name(1) and cell1.n_ok == 2 and cell1.delta == pytest.approx(0.06)
    assert report.cells[0].is_baseline and report.cells[2].failures == [
        (1, "PluginError: kd: temperature must be positive")]
    assert report.cells[3].n_missing == 1


def test_permutation_test_and_other_metric(tmp_path):
    study = write_study(tmp_path / "study")
    report = write_report(study, tmp_path / "out", metric="macro_f1", test="permutation")
    assert report.out_dir == tmp_path / "out" and not (study / "report").exists()
    rows = {r["cell"]: r for r in read_csv(tmp_path / "out" / "cells.csv")}
    b = rows[cell_name(1)]
    assert float(b["p_value"]) == 0.5  # sign flips of (0.05, 0.07): |sum| 0.12 twice out of four
    assert float(b["average_mean"]) == pytest.approx(0.775 - 0.05)
    assert b["delta_ci_low"] != ""  # the t interval is reported either way
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "sign-flip" in md and "**macro_f1**" in md
    assert "+0.060 | 0.5 |" in md  # no CI in the table for the permutation test


def test_truncated_result_is_skipped_with_a_warning(tmp_path):
    study = write_study(tmp_path / "study")
    bad = write_result(study, 3, 1, {"status": "ok", "metrics": {}})
    bad.write_text(bad.read_text()[:40], encoding="utf-8")
    loaded = read_study_dir(study)
    assert len(loaded.runs) == len(VALUES) + len(FAILED)
    assert any(str(bad) in w for w in loaded.warnings)
    report = write_report(study)
    assert any(str(bad) in w for w in report.warnings)
    assert report.cells[3].n_ok == 1 and report.cells[3].n_missing == 1
    assert str(bad) in (study / "report" / "report.md").read_text(encoding="utf-8")


def test_report_before_any_run_finished_ok(tmp_path):
    study = write_study(tmp_path / "study", values={}, failed={(0, 0)})
    report = write_report(study)
    assert {p.name for p in report.files} == {"report.md", "report.html", "cells.csv", "runs.csv"}
    assert not list((study / "report").glob("*.png"))
    assert any("plots skipped" in w for w in report.warnings)
    md = (study / "report" / "report.md").read_text(encoding="utf-8")
    assert "No run has finished ok yet." in md and "0 ok, 1 failed, 7 missing of 8 planned" in md
    assert len(read_csv(study / "report" / "cells.csv")) == 4
    assert "No run has finished ok yet." in (study / "report" / "report.html").read_text(encoding="utf-8")


def test_unknown_baseline_gives_no_deltas(tmp_path):
    study = write_study(tmp_path / "study", baseline="nope")
    report = write_report(study)
    assert any("baseline 'nope'" in w for w in report.warnings)
    assert all(math.isnan(c.delta) for c in report.cells)
    assert "deltas.png" not in {p.name for p in report.files}


def test_baseline_named_by_slug(tmp_path):
    report = write_report(write_study(tmp_path / "study", baseline=slug(0)))
    assert report.cells[0].is_baseline and report.cells[1].delta == pytest.approx(0.06)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no study.json"):
        write_report(tmp_path / "empty")
    study = write_study(tmp_path / "study")
    with pytest.raises(ConfigError, match=r"'f1'.*available: accuracy, macro_f1"):
        write_report(study, metric="f1")
    with pytest.raises(ConfigError, match="test"):
        write_report(study, test="wilcoxon")  # type: ignore[arg-type]


def test_cell_with_every_run_failed(tmp_path):
    values = {k: v for k, v in VALUES.items() if k != (2, 0)}
    study = write_study(tmp_path / "study", values=values, failed={(2, 0), (2, 1)})
    report = write_report(study)
    cell = report.cells[2]
    assert cell.n_ok == 0 and cell.n_failed == 2 and math.isnan(cell.delta)
    row = read_csv(study / "report" / "cells.csv")[2]
    assert [row[k] for k in ("n_ok", "n_failed", "average_mean", "delta_mean", "p_value")] == ["0", "2", "", "", ""]
    md = (study / "report" / "report.md").read_text(encoding="utf-8")
    assert f"| {cell_name(2)} | – | – | – | – | – (no paired seeds) | 0/2 | – |" in md
    assert md.count(f"- {cell_name(2)}, seed") == 2
    assert {"per_language.png", "curves.png", "deltas.png"} <= {p.name for p in report.files}


def test_report_of_one_run_draws_its_losses_and_languages(models, data, tmp_path, capsys):
    import polydistill
    from polydistill.cli import main
    from polydistill.testing import tiny_config

    cfg = tiny_config(models, data, tmp_path, training__epochs=2, training__eval_every=1)
    polydistill.train(cfg)
    assert main(["report", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "report"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.html", "losses.png", "eval_accuracy.png", "eval_macro_f1.png"}
    html_page = (out / "report.html").read_text()
    assert "data:image/png;base64," in html_page and "<td>de</td>" in html_page  # self-contained, per language
    assert "| de |" in capsys.readouterr().out
