"""Runs of one dataset side by side, and the sweep that fills the table in one command.

Heads retrain on cached features in seconds, so trying several is how users choose. The
table is ranked by validation accuracy and the best run is marked by it, because picking
by test accuracy would quietly tune on the test set; test metrics are shown beside it.
The from-scratch baseline lands in the same table, labelled, to show what transfer buys,
and "the ladder" sums it up: the best run of each kind, from scratch to fine-tuned, with
what each scores and costs.
"""

from __future__ import annotations

import itertools
import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from .cache import FeatureCache
from .config import Config, load_config
from .errors import ConfigError, PipelineError
from .heads import kind_of
from .html_report import bar_cell, describe_model, esc, format_params, format_seconds, html_page, sortable_table
from .runs import RunInfo, read_info

# Without --vary: the logistic-regression head (its C is chosen on validation anyway) and a
# small grid of dense heads over the two settings that matter most on bottleneck features.
DEFAULT_GRID: tuple[tuple[str, ...], ...] = (
    ("head.kind=logreg",),
    *(("head.kind=dense", f"head.dense.hidden_units=[{units}]", f"head.dense.dropout={dropout}")
      for units in (256, 1024) for dropout in (0.2, 0.5)),
)


# keys a sweep may vary beyond head.*: it extracts what they need first (incremental: only what is missing)
EXTRACTING_KEYS = ("augment.views", "backbone.pool_blocks")



@dataclass(frozen=True)
class Rung:
    """One step of the ladder: a kind of model, from no transfer at all to a fine-tuned backbone."""
    name: str
    fill: str  # the command that adds a run of this kind


# What each step buys and costs, in order: the ml4a notebook's from-scratch versus transfer
# comparison carried to its end.
LADDER = (
    Rung("from scratch (small CNN, no transfer)", "make baseline"),
    Rung("frozen backbone + head", "make train"),
    Rung("frozen + views / richer features", "make train SET='augment.views=4' (or backbone.pool_blocks=2)"),
    Rung("frozen + test-time augmentation", "make train SET='head.tta=\"flip\"'"),
    Rung("fine-tuned backbone + head", "make finetune"),
)


def rung_of(info: RunInfo) -> Rung:
    """The ladder step a run belongs to, from what its run.json records."""
    kind = kind_of(info.head)
    if not kind.transfer:
        return LADDER[0]
    if kind.fine_tuned:
        return LADDER[4]
    features = info.features or {}
    if features.get("tta", "none") != "none":
        return LADDER[3]
    if features.get("views_used") or (features.get("pool_blocks") or 1) > 1:
        return LADDER[2]
    return LADDER[1]


@dataclass
class RunSummary:
    run_dir: Path
    features: str
    head: str
    params: str
    from_scratch: bool
    val_accuracy: float | None
    split: str | None = None  # the split the report scored: test, or val when there is no test split
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    precision: float | None = None  # macro average over classes
    extract_seconds: float | None = None
    train_seconds: float | None = None
    finetune_seconds: float | None = None
    problem: str | None = None  # why the run has no metrics
    rung: Rung = LADDER[1]

    @property
    def name(self) -> str:
        return self.run_dir.name


def compare_runs(config: Config) -> list[RunSummary]:
    """Every complete run of the config's dataset, best validation accuracy first.

    Runs not reported yet are reported now (seconds per head); a run that cannot be
    reported stays in the table with the reason.
    """
    base = Path(config.run.dir) / config.dataset_name
    run_dirs = sorted(path.parent for path in base.glob("*/run.json")) if base.is_dir() else []
    if not run_dirs:
        raise PipelineError(f"no runs under {base} to compare; fix: run `make train`, `make sweep` or "
                            "`make baseline` with the same config first")
    extract_seconds = _ExtractTimes()
    rows = [_summarise(run_dir, extract_seconds) for run_dir in run_dirs]
    return sorted(rows, key=lambda row: (-(row.val_accuracy if row.val_accuracy is not None else -1), row.name))


def _summarise(run_dir: Path, extract_seconds: "_ExtractTimes") -> RunSummary:
    info = read_info(run_dir)
    features, head = describe_model(info)
    kind = kind_of(info.head)
    scratch = not kind.transfer
    params = info.params
    if kind.shown_params:  # the rest are a fixed recipe (the baseline's), in its report
        params = {key: params.get(key) for key in kind.shown_params}
    extracted = info.extract_seconds if info.extract_seconds is not None else extract_seconds.of(info.cache)
    row = RunSummary(run_dir, features, head, format_params(params), scratch,
                     info.val_accuracy, train_seconds=info.train_seconds, extract_seconds=extracted,
                     finetune_seconds=info.finetune_seconds, rung=rung_of(info))
    metrics_path = run_dir / "report" / "metrics.json"
    if not metrics_path.is_file():
        from .evaluate import run_report

        try:
            run_report(run_dir)
        except PipelineError as exc:
            row.problem = str(exc)
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if metrics.get("n_labeled"):
            row.split, row.accuracy = metrics["split"], metrics["accuracy"]
            row.balanced_accuracy, row.precision = metrics["balanced_accuracy"], metrics["macro_avg"]["precision"]
    return row


class _ExtractTimes:
    """Seconds spent extracting each cache file, read once per file."""

    def __init__(self):
        self._seconds: dict[str, float | None] = {}

    def of(self, cache_file: str | None) -> float | None:
        if cache_file is None:
            return None  # the from-scratch baseline has no extract stage
        if cache_file not in self._seconds:
            try:
                with FeatureCache(cache_file) as cache:
                    self._seconds[cache_file] = (cache.extract_timing() or {}).get("seconds")
            except PipelineError:  # cache deleted or rebuilt since: the time is unknown, not an error
                self._seconds[cache_file] = None
        return self._seconds[cache_file]


def best_run(rows: Sequence[RunSummary]) -> RunSummary | None:
    scored = [row for row in rows if row.val_accuracy is not None]
    return max(scored, key=lambda row: row.val_accuracy) if scored else None


def _split_title(rows: Sequence[RunSummary]) -> str:
    """"test " when every report scored the test split; without one the report scores val again."""
    return "test " if {row.split for row in rows if row.split} == {"test"} else "reported "


def _columns(rows: Sequence[RunSummary]) -> list[tuple[str, str, Callable[[RunSummary], object]]]:
    """(title, "num"|"text", value) for every column, shared by the terminal and the HTML table."""
    split = _split_title(rows)
    return [("run", "text", lambda r: r.name),
            ("features", "text", lambda r: r.features),
            ("head", "text", lambda r: r.head),
            ("val accuracy", "num", lambda r: r.val_accuracy),
            (f"{split}accuracy", "num", lambda r: r.accuracy),
            (f"{split}balanced accuracy", "num", lambda r: r.balanced_accuracy),
            (f"{split}precision (macro)", "num", lambda r: r.precision),
            *_TIME_COLUMNS,
            ("hyperparameters", "text", lambda r: r.params)]


_TIME_COLUMNS = (("extract", "num", lambda r: r.extract_seconds), ("train", "num", lambda r: r.train_seconds),
                 ("fine-tune", "num", lambda r: r.finetune_seconds))
_TIME_TITLES = tuple(title for title, _, _ in _TIME_COLUMNS)


def _text_table(items: Sequence, columns: Sequence[tuple[str, str, Callable]], marks: Sequence[str],
                width: int) -> list[str]:
    """Aligned lines, each row led by its mark; text columns but the last are cut at `width` characters."""

    def cell(kind: str, title: str, value) -> str:
        if value is None:
            return "–"
        if kind == "num":
            return format_seconds(value) if title in _TIME_TITLES else f"{value:.4f}"
        text = str(value)
        return text if len(text) <= width or title == columns[-1][0] else text[:width - 1] + "…"

    pad = " " * max((len(mark) for mark in marks), default=0)
    table = [[pad + columns[0][0], *(title for title, _, _ in columns[1:])]]
    for item, mark in zip(items, marks):
        table.append([cell(kind, title, get(item)) for title, kind, get in columns])
        table[-1][0] = mark + table[-1][0]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return ["  ".join(text.rjust(w) if kind == "num" else text.ljust(w)
                      for text, w, (_, kind, _) in zip(line, widths, columns)).rstrip() for line in table]


def format_table(rows: Sequence[RunSummary], *, width: int = 40) -> str:
    """The terminal table; text columns but the last are cut at `width` characters, the HTML has them whole."""
    best = best_run(rows)
    columns = _columns(rows)
    lines = _text_table(rows, columns, ["* " if row is best else "  " for row in rows], width)
    notes = ["* best validation accuracy (choose on validation; the test columns are for reporting)"]
    if any(row.split == "val" for row in rows):
        notes.append("'reported' columns: runs without a test split are reported on their validation split")
    if any(row.from_scratch for row in rows):
        notes.append("features 'none (from scratch)': the baseline, a small CNN trained on the raw images, no transfer")
    notes += [f"{row.name}: {row.problem}" for row in rows if row.problem]
    return "\n".join(lines + [""] + notes)


@dataclass
class LadderStep:
    rung: Rung
    run: RunSummary | None  # the best run of this kind on validation; None until one is trained


def ladder(rows: Sequence[RunSummary]) -> list[LadderStep]:
    """Every step of LADDER, in order, each with its best run by validation accuracy (or none yet)."""
    return [LadderStep(rung, best_run([row for row in rows if row.rung == rung])) for rung in LADDER]


def _ladder_columns(rows: Sequence[RunSummary]) -> list[tuple[str, str, Callable[[LadderStep], object]]]:
    split = _split_title(rows)

    def of(get):
        return lambda step: None if step.run is None else get(step.run)

    return [("step", "text", lambda step: step.rung.name),
            ("val accuracy", "num", of(lambda r: r.val_accuracy)),
            (f"{split}accuracy", "num", of(lambda r: r.accuracy)),
            (f"{split}balanced accuracy", "num", of(lambda r: r.balanced_accuracy)),
            *((title, kind, of(get)) for title, kind, get in _TIME_COLUMNS),
            ("run", "text", lambda step: step.run.name if step.run else f"none yet: {step.rung.fill}")]


def format_ladder(rows: Sequence[RunSummary], *, width: int = 40) -> str:
    """The ladder for the terminal: one line per step, what it buys (accuracy) and costs (seconds)."""
    steps = ladder(rows)
    lines = _text_table(steps, _ladder_columns(rows), [""] * len(steps), width)
    return "\n".join(["the ladder (best run of each kind on validation):", *lines])


def write_compare_html(path: Path, rows: Sequence[RunSummary], dataset: str) -> Path:
    """compare.html beside the runs: the same table, sortable, each run linking to its report."""
    best = best_run(rows)
    columns = _columns(rows)
    body_rows, classes = [], []
    for row in rows:
        cells = []
        for title, kind, get in columns:
            value = get(row)
            if title == "run":
                mark = '<span class="star" title="best validation accuracy">★</span> ' if row is best else ""
                cells.append((mark + _run_link(row), row.name))
            elif title == "features" and row.from_scratch:
                cells.append((f"<b>{esc(value)}</b>", value))
            else:
                cells.append(_html_cell(kind, title, value))
        body_rows.append(cells)
        classes.append("best" if row is best else "scratch" if row.from_scratch else "run")
    steps = ladder(rows)
    ladder_rows = []
    for step in steps:
        cells = []
        for title, kind, get in _ladder_columns(rows):
            value = get(step)
            if title == "run" and step.run is not None:
                cells.append((_run_link(step.run), step.run.name))
            elif title == "step" and step.rung is LADDER[0]:
                cells.append((f"<b>{esc(value)}</b>", value))
            else:
                cells.append(_html_cell(kind, title, value))
        ladder_rows.append(cells)
    ladder_classes = ["scratch" if step.rung is LADDER[0] else "run" if step.run else "missing" for step in steps]
    ladder_table = sortable_table("ladder", [(t, k) for t, k, _ in _ladder_columns(rows)], ladder_rows,
                                  ladder_classes)
    problems = "".join(f"<li>{esc(row.name)}: {esc(row.problem)}</li>" for row in rows if row.problem)
    body = (f"<header><h1>{esc(dataset)} <small>{len(rows)} runs compared</small></h1>"
            '<p class="note">★ marks the best validation accuracy: choose on validation, the test columns are for '
            "reporting. Rows on an orange ground are the from-scratch baseline (no transfer learning). Click a column "
            "to sort, a run to open its report.</p></header>"
            '<section><h2>The ladder</h2><p class="note">From no transfer at all to a fine-tuned backbone: the best '
            "run of each kind on validation, what it scores and what each stage cost. The from-scratch row learns "
            "from the raw images alone; the gap to the rows below it is what the ImageNet features buy.</p>"
            f"{ladder_table}</section>"
            f"<section><h2>Every run</h2>{sortable_table('compare', [(t, k) for t, k, _ in columns], body_rows, classes)}"
            + (f'<ul class="note">{problems}</ul>' if problems else "") + "</section>")
    Path(path).write_text(html_page(f"{dataset}: runs compared", body), encoding="utf-8")
    return Path(path)


def _run_link(row: RunSummary) -> str:
    return f'<a href="{esc(row.name + "/report/report.html")}">{esc(row.name)}</a>'


def _html_cell(kind: str, title: str, value) -> tuple[str, object]:
    if kind == "num" and title in _TIME_TITLES:
        return esc(format_seconds(value)), "" if value is None else value
    if kind == "num":
        return bar_cell(value)
    return esc(value), value


def run_compare(config: Config) -> tuple[list[RunSummary], Path]:
    rows = compare_runs(config)
    path = write_compare_html(Path(config.run.dir) / config.dataset_name / "compare.html", rows, config.dataset_name)
    return rows, path


def sweep_grid(vary: Sequence[str]) -> list[tuple[str, ...]]:
    """`--set` lists for each combination of `KEY=[alternatives]`; the default grid without any."""
    if not vary:
        return [tuple(combo) for combo in DEFAULT_GRID]
    axes = []
    for item in vary:
        key, sep, text = item.partition("=")
        key = key.strip()
        example = "for example --vary 'head.dense.dropout=[0.2, 0.5]'"
        if not sep or not key:
            raise ConfigError(f"--vary {item!r}: expected KEY=[value, ...], {example}")
        if not key.startswith("head.") and key not in EXTRACTING_KEYS:
            raise ConfigError(f"--vary {key}: a sweep trains heads on one backbone, so it varies head.* keys, "
                              f"{', '.join(EXTRACTING_KEYS)} only; fix: for another backbone run `make extract` "
                              "with it, then sweep again")
        try:
            values = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values = None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--vary {item!r}: the value must be a TOML array of alternatives, {example}")
        axes.append([f"{key}={json.dumps(value)}" for value in values])  # JSON arrays and scalars are TOML too
    return list(itertools.product(*axes))


def run_sweep(config_path: Path | None, overrides: Sequence[str], vary: Sequence[str], *, progress: bool = True,
              log: Callable[[str], None] = print) -> list[Path]:
    """Train and report one head per combination on the config's cache; the run folders, in order.

    Every combination is checked before the first head trains, so a typo fails at once.
    """
    from .evaluate import run_report
    from .train import run_train

    combos = sweep_grid(vary)
    configs = [load_config(config_path, [*overrides, *combo]) for combo in combos]
    run_dirs = []
    for combo, config in tqdm(list(zip(combos, configs)), unit="head", desc="sweep", disable=not progress,
                              file=sys.stderr):
        if any(setting.split("=")[0] in EXTRACTING_KEYS or setting.startswith("head.tta=") for setting in combo):
            from .extract import run_extract  # views or pooled blocks this combination needs; only what is missing

            log(run_extract(config, progress=progress).describe())
        result = run_train(config)
        run_report(result.run_dir)
        log(result.describe())
        run_dirs.append(result.run_dir)
    return run_dirs
