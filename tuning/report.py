"""A sweep's summary artifacts, written from plain data (no Ray, no MLflow here): the trials as CSV
and Markdown, the best trial's full config as YAML, an objective heatmap over two swept keys, the
caption-loss / retrieval Pareto plot and one self-contained HTML page with all of it."""
from __future__ import annotations

import base64
import copy
import csv
import html
import math
import mimetypes
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

# the per-trial metrics the tables show, as (suite, metric) of eval/<suite>/<dataset>/<metric>, in this order;
# POPE accuracy beside its image-blind baseline says whether the F1 column measures presence at all
HEADLINE = (("retrieval", "i2t_r1"), ("retrieval", "t2i_r1"), ("mmeb", "overall"), ("pope", "f1"),
            ("pope", "accuracy"), ("pope", "blind_accuracy"), ("generation", "caption_loss"),
            ("generation", "qa_exact_match"), ("retrieval", "modality_gap"))
BEST_MARK = "★"


@dataclass(slots=True)
class Trial:
    trial_id: str
    status: str  # e.g. TERMINATED, ERROR, STOPPED_EARLY
    params: dict[str, object]  # dotted config keys, e.g. "loss.con_weight"
    metrics: dict[str, float] = field(default_factory=dict)  # last reported values
    objective: float | None = None
    run_id: str | None = None  # the trial's MLflow child run
    iterations: int = 0  # reports seen; an early-stopped trial has fewer


@dataclass(slots=True)
class SweepSummary:
    name: str
    objective_name: str
    mode: Literal["max", "min"]
    trials: list[Trial]
    swept: list[str]  # the dotted keys that vary

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")


def _score(trial: Trial) -> float | None:
    """The objective, None when missing or NaN (a diverged trial ranks nowhere)."""
    value = trial.objective
    return None if value is None or math.isnan(value) else float(value)


def _ranked(summary: SweepSummary) -> list[Trial]:
    """Trials best first, those without an objective last; ties keep the sweep's order."""
    sign = -1.0 if summary.mode == "max" else 1.0
    return sorted(summary.trials, key=lambda t: (_score(t) is None, sign * (_score(t) or 0.0)))


def best_trial(summary: SweepSummary) -> Trial | None:
    ranked = _ranked(summary)
    return ranked[0] if ranked and _score(ranked[0]) is not None else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, minimising x and maximising y.

    Of several equal points only the lowest index is kept. One sweep in x order (y descending
    within equal x) keeps a point exactly when it beats every earlier point's y."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front)


def headline_metrics(trials: list[Trial]) -> list[str]:
    """The HEADLINE metric names any trial reported, in HEADLINE order, then by data set."""
    def rank(name: str) -> tuple[int, str] | None:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "eval" or (parts[1], parts[3]) not in HEADLINE:
            return None  # e.g. a POPE category's f1: eval/pope/<dataset>/<category>/f1
        return HEADLINE.index((parts[1], parts[3])), parts[2]
    names = {name for trial in trials for name in trial.metrics if rank(name) is not None}
    return sorted(names, key=rank)


def _columns(summary: SweepSummary) -> list[str]:
    metrics = headline_metrics(summary.trials)
    return ["trial_id", "status", "iterations", *summary.swept, "objective", *metrics, "run_id"]


def _cells(trial: Trial, columns: list[str]) -> dict[str, object]:
    """A trial's raw values by column; None where it has no value."""
    fixed = {"trial_id": trial.trial_id, "status": trial.status, "iterations": trial.iterations,
             "objective": trial.objective, "run_id": trial.run_id}
    return {c: fixed[c] if c in fixed else trial.params.get(c, trial.metrics.get(c)) for c in columns}


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_table(summary: SweepSummary, out_dir: Path) -> tuple[Path, Path]:
    """trials.csv (raw values, empty where missing) and trials.md (best trial marked), both best first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, trials, best = _columns(summary), _ranked(summary), best_trial(summary)
    csv_path, md_path = out_dir / "trials.csv", out_dir / "trials.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if v is None else v for c, v in _cells(t, columns).items()} for t in trials)
    numeric = {"iterations", "objective", *headline_metrics(summary.trials)}
    lines = [f"# {_md_escape(summary.name)}: {len(trials)} trials, {summary.mode} `{summary.objective_name}`", "",
             "| best | " + " | ".join(_md_escape(c) for c in columns) + " |",
             "|---|" + "".join("---:|" if c in numeric else "---|" for c in columns)]
    for trial in trials:
        values = [_md_escape(_fmt(v)) for v in _cells(trial, columns).values()]
        lines.append(f"| {BEST_MARK if trial is best else ''} | " + " | ".join(values) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


SEED_KEY = "train.seed"


def write_seed_table(summary: SweepSummary, out_dir: Path) -> Path | None:
    """seeds.md when the sweep repeats settings over training orders (`train.seed` swept): per
    setting, each headline metric's mean and range over its seeds, so that a difference between
    two settings can be read against the spread within one. None when no seed is swept."""
    if SEED_KEY not in summary.swept:
        return None
    keys = [k for k in summary.swept if k != SEED_KEY]
    groups: dict[tuple, list[Trial]] = defaultdict(list)
    for trial in summary.trials:
        groups[tuple(_plain(trial.params.get(k)) for k in keys)].append(trial)
    metrics = headline_metrics(summary.trials)
    lines = [f"# {_md_escape(summary.name)}: mean (min to max) over training orders", "",
             "| setting | seeds | " + " | ".join(_md_escape(m) for m in metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for setting, trials in groups.items():
        label = ", ".join(f"{k}={_fmt(v, 3)}" for k, v in zip(keys, setting)) or "all"
        seeds = ", ".join(_fmt(_plain(t.params.get(SEED_KEY))) for t in trials)
        cells = []
        for metric in metrics:
            values = [t.metrics[metric] for t in trials if math.isfinite(t.metrics.get(metric, math.nan))]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})" if values else "-")
        lines.append(f"| {_md_escape(label)} | {seeds} | " + " | ".join(cells) + " |")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "seeds.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plain(value: object) -> object:
    """numpy scalars (as Tune search spaces give) become Python ones, which yaml.safe_dump accepts."""
    return value.item() if isinstance(value, np.generic) else value


def write_best_config(summary: SweepSummary, base_config: dict, out_dir: Path) -> Path:
    """best_config.yaml: `base_config` with the best trial's dotted params set at their nested keys."""
    best = best_trial(summary)
    if best is None:
        raise ValueError(f"sweep {summary.name!r}: no trial reported {summary.objective_name!r}")
    config = copy.deepcopy(base_config)
    for dotted, value in best.params.items():
        if "." not in dotted:  # the arm's name: its values are params of their own
            continue
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                raise KeyError(f"param {dotted!r}: {part!r} is not a section of the base config")
        node[leaf] = _plain(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "best_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _ordered(values: set) -> list:
    """Numbers in numeric order, anything else after them by its text."""
    return sorted(values, key=lambda v: (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))


def _short_key(dotted: str) -> str:
    """Initials of a key's last part: loss.con_weight -> cw, loss.temperature -> t."""
    return "".join(word[0] for word in dotted.rsplit(".", 1)[-1].split("_") if word)


def _short_label(trial: Trial, swept: list[str]) -> str:
    parts = [f"{_short_key(k)}={_fmt(trial.params[k], 3)}" for k in swept if k in trial.params]
    return " ".join(parts) or trial.trial_id


def plot_heatmap(summary: SweepSummary, out_dir: Path, x: str = "loss.con_weight",
                 y: str = "loss.temperature") -> Path | None:
    """The objective over the grid of `x` and `y` values, the mean where several trials share a cell
    (other params or seeds vary); None when fewer than two scored trials have both keys."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for trial in summary.trials:
        if x in trial.params and y in trial.params and (score := _score(trial)) is not None:
            cells[trial.params[x], trial.params[y]].append(score)
    if sum(map(len, cells.values())) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = _ordered({k[0] for k in cells}), _ordered({k[1] for k in cells})
    grid = np.full((len(ys), len(xs)), np.nan)
    for (vx, vy), scores in cells.items():
        grid[ys.index(vy), xs.index(vx)] = np.mean(scores)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2.5), dpi=100)
    # brighter is better either way; empty (NaN) cells stay blank
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis" if summary.mode == "max" else "viridis_r",
                      origin="lower", aspect="auto")
    for (vx, vy), scores in cells.items():
        mean = float(np.mean(scores))
        red, green, blue, _ = image.cmap(image.norm(mean))
        ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        text = f"{mean:.3g}" + (f"\nn={len(scores)}" if len(scores) > 1 else "")
        ax.text(xs.index(vx), ys.index(vy), text, ha="center", va="center", fontsize=8, color=ink)
    ax.set_xticks(range(len(xs)), [_fmt(v, 3) for v in xs])
    ax.set_yticks(range(len(ys)), [_fmt(v, 3) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{summary.name}: {summary.objective_name} ({summary.mode}), mean per cell", fontsize=9)
    fig.colorbar(image, ax=ax, label=summary.objective_name)
    fig.tight_layout()
    path = out_dir / f"heatmap_{_short_key(x)}_{_short_key(y)}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pareto(summary: SweepSummary, out_dir: Path, retrieval_metric: str, caption_metric: str) -> Path | None:
    """Caption loss (lower is better) against retrieval R@1 (higher is better) per trial, the Pareto
    front connected and labelled with its swept params; None when no trial reported both."""
    trials = [t for t in summary.trials
              if all(math.isfinite(t.metrics.get(m, math.nan)) for m in (retrieval_metric, caption_metric))]
    if not trials:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(t.metrics[caption_metric], t.metrics[retrieval_metric]) for t in trials]
    front = sorted(pareto_front(points), key=lambda i: points[i])
    others = [p for i, p in enumerate(points) if i not in front]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if others:
        ax.scatter(*zip(*others), s=20, color="0.6", label="dominated")
    ax.plot(*zip(*(points[i] for i in front)), "-o", color="tab:blue", markersize=5, label="Pareto front")
    for i in front:
        ax.annotate(_short_label(trials[i], summary.swept), points[i], xytext=(4, 4), textcoords="offset points",
                    fontsize=7)
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.set_xlabel(f"{caption_metric} (lower is better)")
    ax.set_ylabel(f"{retrieval_metric} (higher is better)")
    ax.set_title(f"{summary.name}: {len(front)} of {len(trials)} trials on the Pareto front", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pareto.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _markdown_rows(text: str) -> list[list[str]]:
    """The unescaped cells of each table line written by write_table: header, alignment, then trials."""
    lines = [line[1:] for line in text.splitlines() if line.startswith("|")]
    return [[re.sub(r"\\(.)", r"\1", c).strip() for c in re.findall(r"((?:\\.|[^\\|])*)\|", line)] for line in lines]


def _html_table(tables_md: Path) -> str:
    header, alignment, *trials = _markdown_rows(tables_md.read_text())
    right = [a.endswith(":") for a in alignment]
    parts = ["<table class='trials'><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header)
             + "</tr></thead><tbody>"]
    for cells in trials:
        tds = "".join(f"<td class='num'>{html.escape(c)}</td>" if r else f"<td>{html.escape(c)}</td>"
                      for c, r in zip(cells, right))
        parts.append(f"<tr class='best'>{tds}</tr>" if cells[0] == BEST_MARK else f"<tr>{tds}</tr>")
    return "\n".join(parts) + "</tbody></table>"


def _html_image(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f"<figure><img src='data:{mime};base64,{data}' alt='{name}'><figcaption>{name}</figcaption></figure>"


def _html_best(summary: SweepSummary) -> str:
    best = best_trial(summary)
    if best is None:
        return f"<p>No trial reported {html.escape(summary.objective_name)}.</p>"
    facts = [("trial", best.trial_id), ("objective", _fmt(best.objective)), ("status", best.status),
             ("iterations", str(best.iterations)), ("MLflow run", _fmt(best.run_id))]
    facts += [(key, _fmt(value)) for key, value in best.params.items()]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f"<table class='best-params'>{rows}</table>"


_CSS = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { background: #fff3c4; font-weight: 600; }
figure { display: inline-block; margin: 0 1em 1em 0; }
img { max-width: 100%; }
code { background: #f2f2f2; padding: 0 0.2em; }"""


def write_html(summary: SweepSummary, out_dir: Path, images: list[Path], tables_md: Path,
               seeds_md: Path | None = None) -> Path:
    """sweep.html: one self-contained page (inline CSS, images as data URIs, no external URL), so it
    opens anywhere, e.g. as an MLflow artifact or offline."""
    scored = sum(_score(t) is not None for t in summary.trials)
    body = [f"<h1>Sweep {html.escape(summary.name)}</h1>",
            f"<p>Objective <code>{html.escape(summary.objective_name)}</code> ({html.escape(summary.mode)}), "
            f"{len(summary.trials)} trials, {scored} with an objective; swept: "
            + (", ".join(f"<code>{html.escape(k)}</code>" for k in summary.swept) or "nothing") + ".</p>",
            "<h2>Best trial</h2>", _html_best(summary),
            "<h2>Trials</h2>", _html_table(tables_md)]
    if seeds_md is not None:
        body += ["<h2>Over training orders</h2>", _html_table(seeds_md)]
    if images:
        body += ["<h2>Plots</h2>", *map(_html_image, images)]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Sweep {html.escape(summary.name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sweep.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_sweep_report(summary: SweepSummary, base_config: dict, out_dir: Path, *, retrieval_metric: str,
                       caption_metric: str) -> list[Path]:
    """Every artifact above into `out_dir`; returns the files written. A sweep where no trial reported
    its objective (e.g. all failed) still gets its tables and page, but no best_config.yaml."""
    paths = list(write_table(summary, out_dir))
    tables_md, seeds_md = paths[1], write_seed_table(summary, out_dir)
    if seeds_md is not None:
        paths.append(seeds_md)
    if best_trial(summary) is not None:
        paths.append(write_best_config(summary, base_config, out_dir))
    images = [p for p in (plot_heatmap(summary, out_dir), plot_pareto(summary, out_dir, retrieval_metric,
                                                                      caption_metric)) if p is not None]
    return [*paths, *images, write_html(summary, out_dir, images, tables_md, seeds_md)]
