from __future__ import annotations

import copy
import csv
import random
from pathlib import Path

import pytest
import yaml

from tuning.report import (
    SweepSummary,
    Trial,
    best_trial,
    pareto_front,
    plot_heatmap,
    plot_pareto,
    write_best_config,
    write_html,
    write_seed_table,
    write_sweep_report,
    write_table,
)

R1, CAPTION = "eval/retrieval/scenes/i2t_r1", "eval/generation/scenes/caption_loss"
SWEPT = ["loss.con_weight", "loss.temperature"]
BASE = {"name": "demo", "loss": {"compute_contrastive_loss": True, "con_weight": 1.0, "temperature": 0.05},
        "train": {"lr": 1e-4, "zero_stage": 2}, "eval": {"suites": ["retrieval", "pope"]}}


def _trial(i: int, cw: float, t: float, objective: float | None, **kw) -> Trial:
    metrics = {R1: 0.1 * i, CAPTION: 3.0 - 0.2 * i, "eval/pope/pope/f1": 0.5, "eval/pope/pope/random/f1": 0.4,
               "eval/pope/pope/blind_accuracy": 0.5, "eval/pope/pope/accuracy": 0.6,
               "train/loss": 1.0} if objective is not None else {}
    return Trial(f"t{i}", kw.pop("status", "TERMINATED"), {"loss.con_weight": cw, "loss.temperature": t},
                 metrics, objective, kw.pop("run_id", f"run{i}"), kw.pop("iterations", 5))


@pytest.fixture
def summary() -> SweepSummary:
    trials = [_trial(0, 0.5, 0.05, 0.30), _trial(1, 0.5, 0.1, 0.52), _trial(2, 1.0, 0.05, 0.41),
              _trial(3, 1.0, 0.05, 0.45, iterations=2, status="STOPPED_EARLY"),
              _trial(4, 0.0, 0.1, None, status="ERROR", run_id=None, iterations=0)]
    return SweepSummary("grid", "objective", "max", trials, SWEPT)


def _dominated(p: tuple[float, float], q: tuple[float, float]) -> bool:
    return q[0] <= p[0] and q[1] >= p[1] and q != p


def test_pareto_front_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        # few distinct values, so ties in x, in y and whole duplicates are common
        points = [(rng.randint(0, 5) / 2, rng.randint(0, 5) / 2) for _ in range(rng.randint(0, 12))]
        expected = [i for i, p in enumerate(points)
                    if not any(_dominated(p, q) for q in points) and p not in points[:i]]
        assert pareto_front(points) == expected


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(1.0, 1.0)], [0]),
    ([(1.0, 1.0), (2.0, 2.0), (3.0, 1.5)], [0, 1]),  # (3, 1.5) is dominated by (2, 2)
    ([(2.0, 1.0), (1.0, 1.0)], [1]),  # same y, lower x wins
    ([(1.0, 1.0), (1.0, 2.0)], [1]),  # same x, higher y wins
    ([(1.0, 1.0), (1.0, 1.0), (0.5, 0.2)], [0, 2]),  # a duplicate is kept once, at the lower index
])
def test_pareto_front_hand_worked(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


def test_best_trial_modes_and_missing_objectives(summary: SweepSummary) -> None:
    assert best_trial(summary).trial_id == "t1"
    summary.mode = "min"
    assert best_trial(summary).trial_id == "t0"
    summary.trials[0].objective = float("nan")  # a diverged trial is not the best
    assert best_trial(summary).trial_id == "t2"
    for trial in summary.trials:
        trial.objective = None
    assert best_trial(summary) is None
    with pytest.raises(ValueError, match="mode"):
        SweepSummary("x", "objective", "maximise", [], [])  # type: ignore[arg-type]


def test_table_csv_round_trip_and_markdown(summary: SweepSummary, tmp_path: Path) -> None:
    csv_path, md_path = write_table(summary, tmp_path)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == ["t1", "t3", "t2", "t0", "t4"]  # best first, no objective last
    assert list(rows[0]) == ["trial_id", "status", "iterations", *SWEPT, "objective", R1, "eval/pope/pope/f1",
                             "eval/pope/pope/accuracy", "eval/pope/pope/blind_accuracy", CAPTION,
                             "run_id"]  # headline metrics only, in their order, no POPE category, no train/loss
    by_id = {r["trial_id"]: r for r in rows}
    for trial in summary.trials:
        row = by_id[trial.trial_id]
        assert float(row["loss.con_weight"]) == trial.params["loss.con_weight"]
        assert float(row["loss.temperature"]) == trial.params["loss.temperature"]
        assert row["run_id"] == (trial.run_id or "") and int(row["iterations"]) == trial.iterations
    assert by_id["t4"]["objective"] == "" and by_id["t4"][R1] == ""
    lines = md_path.read_text().splitlines()
    assert lines[4].startswith("| ★ | t1 |") and "| 0.52 |" in lines[4]
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(summary.trials)


def test_best_config_sets_nested_keys(summary: SweepSummary, tmp_path: Path) -> None:
    summary.trials[1].params["loss.compute_contrastive_loss"] = False
    base = copy.deepcopy(BASE)
    config = yaml.safe_load(write_best_config(summary, base, tmp_path).read_text())
    assert config["loss"] == {"compute_contrastive_loss": False, "con_weight": 0.5, "temperature": 0.1}
    assert {k: v for k, v in config.items() if k != "loss"} == {k: v for k, v in BASE.items() if k != "loss"}
    assert base == BASE  # the caller's dict is left alone
    summary.trials[1].params["nope.key"] = 1
    with pytest.raises(KeyError, match="nope"):
        write_best_config(summary, BASE, tmp_path)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_heatmap(summary: SweepSummary, tmp_path: Path) -> None:
    assert plot_heatmap(summary, tmp_path, x="loss.missing") is None
    assert plot_heatmap(summary, tmp_path, y="train.lr") is None
    single = SweepSummary("one", "objective", "max", summary.trials[:1], SWEPT)
    assert plot_heatmap(single, tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert _is_png(plot_heatmap(summary, tmp_path))


def test_pareto_plot(summary: SweepSummary, tmp_path: Path) -> None:
    assert plot_pareto(summary, tmp_path, "eval/retrieval/missing/i2t_r1", CAPTION) is None
    assert _is_png(plot_pareto(summary, tmp_path, R1, CAPTION))


def test_html_is_self_contained_and_escaped(summary: SweepSummary, tmp_path: Path) -> None:
    summary.trials[2].trial_id = "<script>alert(1)</script>"
    summary.trials[2].run_id = "r|un&2"
    paths = write_sweep_report(summary, BASE, tmp_path, retrieval_metric=R1, caption_metric=CAPTION)
    assert sorted(p.name for p in paths) == ["best_config.yaml", "heatmap_cw_t.png", "pareto.png", "sweep.html",
                                             "trials.csv", "trials.md"]
    assert all(p.is_file() for p in paths)
    page = (tmp_path / "sweep.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "r|un&amp;2" in page  # the markdown pipe escape is undone, then HTML-escaped
    for trial in summary.trials[:2] + summary.trials[3:]:
        assert trial.trial_id in page and (trial.run_id is None or trial.run_id in page)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("src='data:image/png;base64,") == 2 and "src='data:image/png;base64,iVBOR" in page
    assert "grid" in page and "objective" in page and "max" in page


def test_report_without_objectives(summary: SweepSummary, tmp_path: Path) -> None:
    for trial in summary.trials:
        trial.objective = None
    paths = write_sweep_report(summary, BASE, tmp_path, retrieval_metric=R1, caption_metric=CAPTION)
    assert sorted(p.name for p in paths) == ["pareto.png", "sweep.html", "trials.csv", "trials.md"]
    assert "No trial reported objective" in (tmp_path / "sweep.html").read_text()
    html_only = write_html(summary, tmp_path / "bare", [], paths[1])
    assert "<img" not in html_only.read_text()


def test_seed_table_gives_each_setting_its_mean_and_range(tmp_path: Path) -> None:
    def trial(i: int, arm: str, seed: int, r1: float) -> Trial:
        return Trial(f"t{i}", "TERMINATED", {"arm": arm, "train.seed": seed}, {R1: r1, CAPTION: 0.4}, r1)

    trials = [trial(0, "lm_only", 0, 0.01), trial(1, "cafe", 0, 0.2), trial(2, "lm_only", 1, 0.03),
              trial(3, "cafe", 1, 0.6), trial(4, "cafe", 2, 0.4)]
    summary = SweepSummary("ablation", "objective", "max", trials, ["arm", "train.seed"])
    paths = write_sweep_report(summary, BASE, tmp_path, retrieval_metric=R1, caption_metric=CAPTION)
    assert (tmp_path / "seeds.md") in paths
    rows = {line.split(" | ")[0]: line for line in (tmp_path / "seeds.md").read_text().splitlines()[4:]}
    assert rows.keys() == {"| arm=lm_only", "| arm=cafe"}
    assert "| 0, 1, 2 |" in rows["| arm=cafe"] and "0.400 (0.200 to 0.600)" in rows["| arm=cafe"]
    assert "0.020 (0.010 to 0.030)" in rows["| arm=lm_only"]
    assert "Over training orders" in (tmp_path / "sweep.html").read_text()
    summary.swept = ["arm"]
    assert write_seed_table(summary, tmp_path / "one-seed") is None
