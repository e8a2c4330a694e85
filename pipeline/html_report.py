"""One self-contained HTML page per run: the report people show their team.

Everything is inline (CSS, a little vanilla JS, SVG charts, thumbnails as base64 data
URIs) and a Content-Security-Policy forbids anything else, so the file can be mailed and
opened offline. Every name that came from the user's folders is HTML-escaped: class and
file names are data, never markup.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from .dataset import ImageEntry
from .features import label_conflicts
from .heads import kind_of
from .runs import Run, RunInfo

THUMBNAIL_PX = 128
MAX_GALLERY = 120  # misclassified thumbnails; all of them are in predictions.jsonl
MAX_CONFIDENT = 12
MAX_PAIRS = 20
MAX_CONFLICTS = 40
MAX_UNLABELED = 48
COUNTS_IN_CELLS_UP_TO = 30  # classes; beyond that the heatmap shows counts on hover only
_SHADES = 10
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def esc(value) -> str:
    """Text as HTML; bytes of file names that are not UTF-8 show as escapes instead of breaking the file."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return html.escape(text, quote=True)


def conflict_groups(entries: Iterable[ImageEntry], keys: Mapping[str, str]) -> list[list[list[str]]]:
    """[[relpath, label], ...] per image content filed under more than one label, as plain JSON data."""
    groups = [[[entry.relpath, entry.label] for entry in group] for group in label_conflicts(entries, keys).values()]
    return sorted(groups)


def script_json(value) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the names contain."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_html_report(path: Path, *, run: Run, metrics: dict, images: Sequence[str],
                      true_labels: Sequence[str | None], probabilities: np.ndarray, image_root: Path | None,
                      timings: dict[str, float | None], conflicts: Sequence[Sequence[Sequence[str]]] = (),
                      data_issues=None) -> Path:
    """report.html for one scored split, from what write_report was given and returned.

    `image_root` is where the run's relative image paths point (None: no thumbnails);
    `timings` maps stage names to seconds, None where unknown; `conflicts` comes from
    `conflict_groups`: the copies training left out because they carry two labels;
    `data_issues` (a DataIssues) adds label errors, near-duplicates, unfamiliar images and the map.
    """
    from .html_data_issues import data_sections, headline_alerts

    labels = run.labels
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truths = list(true_labels)
    thumbs = Thumbnails(image_root)
    sections = [_headline(run, metrics, timings, headline_alerts(data_issues))]
    if metrics["n_labeled"]:
        matrix = np.array(metrics["confusion_matrix"])
        mistakes = _mistakes(labels, images, truths, probabilities)
        sections += [_confusion_section(labels, matrix), _pairs_section(labels, matrix),
                     _per_class_section(labels, metrics, matrix)]
        surest = sorted(mistakes, key=lambda m: -m.confidence)
        check = "the model was surest of these wrong answers: check their labels first"
        if len(mistakes) > MAX_CONFIDENT:
            sections += [_gallery_section("Most confident mistakes", "confident", surest[:MAX_CONFIDENT],
                                          len(mistakes), thumbs, labels, note=check),
                         _gallery_section("Misclassified images", "misclassified", mistakes[:MAX_GALLERY],
                                          len(mistakes), thumbs, labels, note="grouped by true class, surest first")]
        else:  # few enough to show once, most confident first
            sections.append(_gallery_section("Misclassified images, most confident first", "misclassified", surest,
                                             len(mistakes), thumbs, labels, note=check))
    else:
        sections.append('<section><p class="note">No labeled images in this split: nothing to score against.</p>'
                        "</section>")
    unlabeled = [_Scored(image, None, row) for image, truth, row in zip(images, truths, probabilities) if truth is None]
    if unlabeled:
        sections.append(_gallery_section("Unlabeled images", "unlabeled", unlabeled[:MAX_UNLABELED], len(unlabeled),
                                         thumbs, labels, note="scored with class “unknown”; top-3 predictions"))
    sections += [_conflicts_section(conflicts, thumbs), *data_sections(data_issues, labels, thumbs, image_root),
                 _history_section(run)]
    title = f"{run.info.dataset}: {' + '.join(describe_model(run.info))}"
    Path(path).write_text(html_page(title, "\n".join(s for s in sections if s)), encoding="utf-8")
    return Path(path)


def html_page(title: str, body: str) -> str:
    """A complete offline page with the shared style and the sortable-table script."""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}{_shade_css()}</style></head>\n"
            f'<body><main>\n{body}\n</main><div id="tip" hidden></div><script>{_JS}</script></body></html>\n')


def sortable_table(table_id: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[tuple[str, object]]],
                   row_classes: Sequence[str] = ()) -> str:
    """columns: (title, "num"|"text"); each row: (cell HTML, sort value) pairs. Click a header to sort."""
    head = "".join(f'<th data-type="{kind}" tabindex="0">{esc(title)}</th>' for title, kind in columns)
    body = []
    for row, css in zip(rows, row_classes or [""] * len(rows)):
        cells = "".join(f'<td data-v="{esc(_sort_key(value))}">{cell}</td>' for cell, value in row)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table id="{esc(table_id)}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def bar_cell(value: float | None) -> tuple[str, object]:
    """A 0..1 metric drawn as a bar behind its number, as a sortable_table cell."""
    if value is None or not math.isfinite(value):
        return "–", ""
    width = max(0.0, min(1.0, value)) * 100
    return f'<span class="bar" style="width:{width:.1f}%"></span>{value:.3f}', value


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def describe_model(info: RunInfo) -> tuple[str, str]:
    """(where the features came from, what was trained on them), for headlines and the comparison table."""
    kind = kind_of(info.head)
    if not kind.transfer:
        return "none (from scratch)", f"small CNN on {info.params.get('image_size')} px images"
    fp = info.fingerprint or {}
    alpha = f" α={fp['alpha']}" if fp.get("alpha") is not None else ""
    weights = str(fp.get("weights", "")).split(":", 1)[0]
    if kind.fine_tuned:  # the backbone's top was trained with the head
        return f"{fp.get('backbone', '?')}{alpha} ({weights}, fine-tuned)", f"{info.finetuned_from['head']}, fine-tuned"
    return f"{fp.get('backbone', '?')}{alpha} ({weights})", info.head


def format_params(params: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


# ---------------------------------------------------------------- sections

def _headline(run: Run, metrics: dict, timings: dict, alerts: Sequence[str] = ()) -> str:
    info = run.info
    scratch = not kind_of(info.head).transfer
    features, head = describe_model(info)
    badges = []
    if metrics["n_labeled"]:
        badges = [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"])]
        if "top5_accuracy" in metrics:
            badges.append(("top-5 accuracy", metrics["top5_accuracy"]))
    badge_html = "".join(f'<div class="badge"><b>{value:.1%}</b><span>{esc(name)}</span></div>'
                         for name, value in badges)
    sizes = info.split_sizes
    scored = f"{metrics['n_labeled']} labeled" + (f" + {metrics['n_unlabeled']} unlabeled"
                                                   if metrics["n_unlabeled"] else "")
    facts = [("dataset", f"{info.dataset} · {len(run.labels)} classes"),
             ("splits", " · ".join(f"{name} {count}" for name, count in sizes.items())),
             ("scored", f"{metrics['split']} split: {scored} images"),
             ("features", features),
             ("head", head),
             ("chosen hyperparameters", format_params(info.params)),
             ("time", " · ".join(f"{stage} {format_seconds(seconds)}" for stage, seconds in timings.items())),
             ("run", f"{run.dir.name} ({info.created})")]
    rows = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in facts)
    banner = ('<p class="scratch">From-scratch baseline: a small CNN trained on the raw images with the same '
              "splits, no ImageNet features. Compare it with the transfer runs to see what transfer buys.</p>"
              if scratch else "")
    return (f'<header><h1>{esc(info.dataset)} <small>{esc(features)} → {esc(head)}</small></h1>'
            f'{banner}<div class="badges">{badge_html}</div>{"".join(alerts)}<table class="facts">{rows}</table>'
            "</header>")


def _confusion_section(labels: list[str], matrix: np.ndarray) -> str:
    n = len(labels)
    totals = matrix.sum(1)
    shares = matrix / np.maximum(totals[:, None], 1)
    show_counts = n <= COUNTS_IN_CELLS_UP_TO
    head = "".join(f'<th class="col" title="{esc(label)}"><span>{esc(label)}</span></th>' for label in labels)
    body = []
    for i, label in enumerate(labels):
        cells = []
        for j in range(n):
            count = int(matrix[i, j])
            shade = _shade(shares[i, j])
            css = f"{'d' if i == j else 'o'}{shade}" if count else ""
            text = str(count) if show_counts and count else ""
            cells.append(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>")
        body.append(f'<tr><th class="row" title="{esc(label)}">{esc(label)}</th>{"".join(cells)}'
                    f'<td class="n">{int(totals[i])}</td></tr>')
    data = script_json({"labels": labels, "matrix": matrix.tolist()})
    legend = "".join(f'<i class="o{s}"></i>' for s in range(_SHADES))
    legend_d = "".join(f'<i class="d{s}"></i>' for s in range(_SHADES))
    size = "small" if show_counts else "large"
    return (f'<section><h2>Confusion matrix</h2><p class="note">Rows are true classes, columns predictions; colour is '
            f"the share of the row's images (row-normalised), so small classes read as clearly as big ones. "
            f"{'Counts are in the cells; hover' if show_counts else 'Hover'} a cell for its count and share.</p>"
            f'<p class="legend">correct <span class="scale">{legend_d}</span> confused as another class '
            f'<span class="scale">{legend}</span> 0 → 100% of the row</p>'
            f'<div class="cm-wrap"><table id="confusion" class="cm {size}"><thead><tr><th class="corner">'
            f"true ↓ · predicted →</th>{head}<th class=\"n\">n</th></tr></thead><tbody>{''.join(body)}</tbody>"
            f'</table></div><script type="application/json" id="cm-data">{data}</script></section>')


def _pairs_section(labels: list[str], matrix: np.ndarray) -> str:
    totals = matrix.sum(1)
    pairs = [(int(matrix[i, j]), matrix[i, j] / max(totals[i], 1), i, j)
             for i, j in zip(*np.nonzero(matrix)) if i != j]
    if not pairs:
        return ('<section><h2>Most-confused pairs</h2><p class="note">No confusions: every image was right.</p>'
                "</section>")
    pairs.sort(key=lambda p: (-p[0], -p[1], labels[p[2]], labels[p[3]]))
    items = "".join(f'<li><b>{esc(labels[i])}</b> taken for <b>{esc(labels[j])}</b>: {count} image'
                    f'{"s" if count != 1 else ""} <span class="muted">({share:.0%} of {esc(labels[i])})</span></li>'
                    for count, share, i, j in pairs[:MAX_PAIRS])
    return (f'<section><h2>Most-confused pairs</h2><p class="note">True class taken for another, most images first '
            f"({min(len(pairs), MAX_PAIRS)} of {len(pairs)}).</p><ol class=\"pairs\">{items}</ol></section>")


def _per_class_section(labels: list[str], metrics: dict, matrix: np.ndarray) -> str:
    per_class = metrics["per_class"]
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = sorted(range(len(labels)), key=lambda i: (per_class[labels[i]]["f1"], per_class[labels[i]]["recall"],
                                                      -per_class[labels[i]]["support"], labels[i]))
    rows = []
    for i in order:
        stats = per_class[labels[i]]
        worst = int(off[i].argmax())
        confused = f"{esc(labels[worst])} ({int(off[i, worst])})" if off[i, worst] else ""
        rows.append([(esc(labels[i]), labels[i]), bar_cell(stats["precision"]), bar_cell(stats["recall"]),
                     bar_cell(stats["f1"]), (str(stats["support"]), stats["support"]),
                     (confused, labels[worst] if confused else "")])
    columns = [("class", "text"), ("precision", "num"), ("recall", "num"), ("F1", "num"), ("support", "num"),
               ("most often taken for", "text")]
    return ('<section><h2>Per class</h2><p class="note">Worst F1 first; click a column to sort.</p>'
            f"{sortable_table('per-class', columns, rows)}</section>")


class _Scored:
    def __init__(self, image: str, truth: str | None, row: np.ndarray):
        self.image, self.truth, self.row = image, truth, row
        self.confidence = float(row.max())


def _mistakes(labels: list[str], images: Sequence[str], truths: Sequence[str | None],
              probabilities: np.ndarray) -> list[_Scored]:
    """Wrongly predicted labeled images, by true class then surest first."""
    index = {label: i for i, label in enumerate(labels)}
    wrong = [_Scored(image, truth, row) for image, truth, row in zip(images, truths, probabilities)
             if truth is not None and int(row.argmax()) != index[truth]]
    return sorted(wrong, key=lambda m: (index[m.truth], -m.confidence, m.image))


def _gallery_section(title: str, css_id: str, shown: list[_Scored], total: int, thumbs: "Thumbnails",
                     labels: list[str], note: str) -> str:
    if not total:
        return ""
    cards = []
    for item in shown:
        top = np.argsort(-item.row, kind="stable")[:3]
        guesses = "".join(
            f'<li class="{"hit" if labels[k] == item.truth else "miss" if rank == 0 else ""}">'
            f'{esc(labels[k])} <span>{item.row[k]:.0%}</span></li>' for rank, k in enumerate(top))
        truth = (f'<div class="truth">true: <b>{esc(item.truth)}</b></div>' if item.truth is not None else "")
        cards.append(f'<figure class="card">{thumbs.tag(item.image)}<figcaption>{truth}<ol>{guesses}</ol>'
                     f'<div class="path" title="{esc(item.image)}">{esc(item.image)}</div></figcaption></figure>')
    more = f" Showing {len(shown)} of {total}; every image is in predictions.jsonl." if len(shown) < total else ""
    return (f'<section><h2>{esc(title)} <small>{total}</small></h2><p class="note">{esc(note)}.{esc(more)}</p>'
            f'<div class="gallery" id="{esc(css_id)}">{"".join(cards)}</div></section>')


def _conflicts_section(conflicts: Sequence[Sequence[Sequence[str]]], thumbs: "Thumbnails") -> str:
    """The same file content under two labels: a labelling problem no model can fix."""
    if not conflicts:
        return ""
    cards = []
    for group in conflicts[:MAX_CONFLICTS]:
        names = "".join(f'<li><b>{esc(label)}</b> <span class="path">{esc(relpath)}</span></li>'
                        for relpath, label in group)
        cards.append(f'<figure class="card wide">{thumbs.tag(group[0][0])}<figcaption><ul>{names}</ul>'
                     "</figcaption></figure>")
    more = f" Showing {MAX_CONFLICTS} of {len(conflicts)}." if len(conflicts) > MAX_CONFLICTS else ""
    return (f'<section><h2>Same image, different labels <small>{len(conflicts)}</small></h2><p class="note">'
            "These files have identical content but sit under more than one class: at most one label can be right, "
            f"so training left them out. Delete the wrong copies and train again (nothing is re-extracted).{more}</p>"
            f'<div class="gallery" id="conflicts">{"".join(cards)}</div></section>')


def _history_section(run: Run) -> str:
    path = run.dir / "history.json"
    history = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if history and "epoch" in history[0]:
        best = run.info.params.get("best_epoch")
        epochs = [h["epoch"] for h in history]
        charts = [line_chart(title, epochs, [(name, [h.get(key) for h in history], css) for name, key, css in series],
                             mark=best, x_label="epoch")
                  for title, series in (("loss", [("training", "loss", "s1"), ("validation", "val_loss", "s2")]),
                                        ("accuracy", [("training", "accuracy", "s1"),
                                                      ("validation", "val_accuracy", "s2")]))]
        kept = f", epoch {best}" if best else ""
        note = f"Per epoch; the dashed line marks the epoch kept ({run.info.kept_by or 'best validation loss'}{kept})."
        return (f'<section><h2>Training curves</h2><p class="note">{esc(note)}</p>'
                f'<div class="charts">{"".join(charts)}</div></section>')
    if history and "C" in history[0]:
        params = run.info.params
        on = "cv" if "cv_accuracy" in history[0] else "val"  # heads chosen on validation keep val_ scores
        setting = ("C", "normalization", "view_weight")
        rows = "".join(f'<tr class="{"chosen" if all(h.get(k) == params.get(k) for k in setting) else ""}">'
                       f'<td>{h["C"]:g}</td><td>{esc(str(h.get("normalization", "none")))}</td>'
                       f'<td>{h.get("view_weight", 0.0):g}</td>'
                       f'<td>{h[f"{on}_accuracy"]:.4f}</td><td>{h[f"{on}_log_loss"]:.4f}</td></tr>' for h in history)
        where, what = (("by cross-validation over the training images (the validation split took no part)", "cv")
                       if on == "cv" else ("on the validation split", "val"))
        return ('<section><h2>Regularisation search</h2><p class="note">Each setting scored '
                f'{where}; the highlighted one was kept.</p><table class="plain"><thead><tr><th>C</th>'
                f"<th>normalisation</th><th>view weight</th><th>{what} accuracy</th><th>{what} log loss</th></tr>"
                f"</thead><tbody>{rows}</tbody></table></section>")
    return ""


# ---------------------------------------------------------------- pieces

def line_chart(title: str, xs: Sequence[float], series: Sequence[tuple[str, Sequence[float | None], str]], *,
               mark: float | None = None, x_label: str = "", width: int = 440, height: int = 260) -> str:
    """An inline SVG line chart: one polyline per series, nice ticks, an optional dashed marker."""
    left, right, top, bottom = 52, 12, 28, 40
    values = [v for _, ys, _ in series for v in ys if v is not None and math.isfinite(v)]
    if not xs or not values:
        return ""
    y_ticks = _nice_ticks(min(values), max(values))
    x_ticks = _nice_ticks(min(xs), max(xs), integer=True)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><text x="{left}" y="16" class="title">{esc(title)}</text>']
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
                     f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{y:g}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" class="tick" text-anchor="middle">'
                 f"{esc(x_label)}</text>")
    if mark is not None:
        parts.append(f'<line class="mark" x1="{sx(mark):.1f}" x2="{sx(mark):.1f}" y1="{top}" y2="{height - bottom}"/>')
    for k, (name, ys, css) in enumerate(series):
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y is not None and math.isfinite(y))
        parts.append(f'<polyline class="{css}" points="{points}"/>'
                     f'<text x="{width - right - 110}" y="{16 + 14 * k}" class="key {css}">— {esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice_ticks(low: float, high: float, *, integer: bool = False, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    if integer:
        step = max(1, round(step))
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value < high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _shade(share: float) -> int:
    return min(_SHADES - 1, max(0, math.ceil(share * _SHADES) - 1))


def _shade_css() -> str:
    """Ten steps per scale: blue for the diagonal (right), orange-red for confusions."""
    rules = []
    for s in range(_SHADES):
        alpha = 0.12 + 0.88 * s / (_SHADES - 1)
        ink = "color:#fff;" if alpha > 0.55 else ""
        rules.append(f".d{s}{{background:rgba(29,78,216,{alpha:.2f});{ink}}}"
                     f".o{s}{{background:rgba(220,38,38,{alpha:.2f});{ink}}}")
    return "".join(rules)


def _sort_key(value) -> str:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


class Thumbnails:
    """Small JPEG data URIs of the dataset's images, made once per path (shared by every gallery of a page)."""

    def __init__(self, root: Path | None):
        self.root = root
        self._made: dict[str, str | None] = {}

    def tag(self, relpath: str) -> str:
        if relpath not in self._made:
            self._made[relpath] = self._encode(relpath)
        uri = self._made[relpath]
        if uri is None:
            return '<div class="noimg">image not found</div>'
        return f'<img src="{uri}" alt="{esc(relpath)}">'

    def _encode(self, relpath: str) -> str | None:
        if self.root is None:
            return None
        try:
            with Image.open(self.root / relpath) as image:
                image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
                picture = ImageOps.exif_transpose(image).convert("RGB")
                picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG", quality=80)
        except Exception:  # a moved or unreadable file only loses its thumbnail, never the report
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--accent:#1d4ed8;--bad:#dc2626;--bg:#f8fafc}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1400px;margin:0 auto;padding:24px}
section,header{background:#fff;border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:0 0 18px}
h1{margin:0 0 10px;font-size:24px}h1 small{color:var(--muted);font-weight:400;font-size:16px}
h2{margin:0 0 8px;font-size:18px}h2 small{color:var(--muted);font-weight:400}
.note,.muted{color:var(--muted)}.note{margin:0 0 12px}
.scratch{background:#fff7ed;border:1px solid #fdba74;border-radius:8px;padding:8px 12px;margin:0 0 12px}
.badges{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0 14px}
.badge{border:1px solid var(--line);border-radius:10px;padding:10px 18px;min-width:150px}
.badge b{display:block;font-size:30px;color:var(--accent)}.badge span{color:var(--muted)}
table{border-collapse:collapse}
.facts th{text-align:left;color:var(--muted);font-weight:500;padding:2px 16px 2px 0;vertical-align:top}
.facts td{padding:2px 0}
.cm-wrap{overflow:auto;max-height:90vh;border:1px solid var(--line)}
.cm{font-size:11px;table-layout:fixed}
.cm td{border:1px solid #f1f5f9;text-align:center;padding:0;cursor:default}
.cm.small td{width:34px;height:28px;font-size:12px}.cm.large td{width:12px;height:12px;min-width:12px}
.cm th.row{text-align:right;padding:0 6px;white-space:nowrap;max-width:220px;overflow:hidden;text-overflow:ellipsis;
 font-weight:400;position:sticky;left:0;background:#fff;z-index:1}
.cm th.col{vertical-align:bottom;padding:4px 0;font-weight:400;position:sticky;top:0;background:#fff}
.cm th.col span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;display:inline-block;
 max-height:160px;overflow:hidden;text-overflow:ellipsis}
.cm th.corner{position:sticky;left:0;top:0;z-index:2;background:#fff;color:var(--muted);font-weight:400;
 vertical-align:bottom;padding:4px 6px}
.cm .n{color:var(--muted);padding:0 6px;width:auto}
.cm th.hl{color:var(--accent);font-weight:700}
.legend{font-size:12px;color:var(--muted)}.scale{display:inline-flex;margin:0 10px 0 4px;vertical-align:middle}
.scale i{display:inline-block;width:14px;height:12px}
#tip{position:fixed;pointer-events:none;background:#111827;color:#fff;padding:6px 9px;border-radius:6px;
 font-size:12px;max-width:360px;z-index:10}
.pairs li{margin:2px 0}
.sortable{width:100%}.sortable th{min-width:80px;text-align:left;border-bottom:2px solid var(--line);
 padding:6px 10px;cursor:pointer;user-select:none;vertical-align:bottom}
.sortable th:after{content:" ↕";color:#cbd5e1}.sortable th.asc:after{content:" ▲";color:var(--accent)}
.sortable th.desc:after{content:" ▼";color:var(--accent)}
.scroll{overflow-x:auto}.sortable td:last-child{white-space:normal;min-width:200px}
.sortable td{padding:4px 10px;border-bottom:1px solid #f1f5f9;position:relative;white-space:nowrap}
.sortable tr.best td{background:#ecfdf5}.sortable tr.scratch td{background:#fff7ed}
.sortable td{z-index:0}.bar{position:absolute;left:0;top:calc(50% - 10px);height:20px;background:#dbeafe;z-index:-1}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
.card{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
.card.wide{grid-column:span 2}
.card img{display:block;width:100%;height:128px;object-fit:contain;background:#f1f5f9;border-radius:4px}
.noimg{height:128px;display:flex;align-items:center;justify-content:center;background:#f1f5f9;color:var(--muted)}
.card figcaption{font-size:12px;margin-top:6px;word-break:break-word}
.card ol,.card ul{margin:4px 0;padding-left:18px}.card li span{color:var(--muted)}
.card li.miss{color:var(--bad);font-weight:600}.card li.hit{color:#15803d;font-weight:600}
.path{color:var(--muted);font-size:11px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.charts{display:flex;gap:18px;flex-wrap:wrap}
.chart .title{font-weight:600;font-size:13px}.chart .tick{font-size:11px;fill:var(--muted)}
.chart .grid{stroke:#eef2f7}.chart .mark{stroke:#9ca3af;stroke-dasharray:4 3}
.chart polyline{fill:none;stroke-width:2}.chart .key{font-size:12px}
.chart polyline.s1{stroke:#1d4ed8}.chart polyline.s2{stroke:#ea580c}
.chart text.s1{fill:#1d4ed8}.chart text.s2{fill:#ea580c}
.plain th,.plain td{padding:3px 14px 3px 0;text-align:left}.plain tr.chosen td{font-weight:700;color:var(--accent)}
@media print{body{background:#fff}section,header{break-inside:avoid;border:0}.cm-wrap{max-height:none;overflow:visible}}
"""

_JS = """
(function(){
  function sortBy(table, th){
    var col = th.cellIndex, num = th.dataset.type === 'num';
    var asc = !th.classList.contains('asc');
    table.querySelectorAll('th').forEach(function(h){ h.classList.remove('asc','desc'); });
    th.classList.add(asc ? 'asc' : 'desc');
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (num){ x = x === '' ? -Infinity : parseFloat(x); y = y === '' ? -Infinity : parseFloat(y); }
      var c = num ? x - y : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  }
  document.querySelectorAll('table.sortable th').forEach(function(th){
    var table = th.closest('table');
    th.addEventListener('click', function(){ sortBy(table, th); });
    th.addEventListener('keydown', function(e){ if (e.key === 'Enter') sortBy(table, th); });
  });
  var cm = document.getElementById('confusion'), data = document.getElementById('cm-data');
  var tip = document.getElementById('tip');
  if (!cm || !data) return;
  var d = JSON.parse(data.textContent), lit = [];
  function clear(){ lit.forEach(function(e){ e.classList.remove('hl'); }); lit = []; tip.hidden = true; }
  cm.addEventListener('mouseover', function(e){
    var td = e.target.closest('td');
    clear();
    if (!td || td.classList.contains('n')) return;
    var i = td.parentNode.sectionRowIndex, j = td.cellIndex - 1, row = d.matrix[i];
    var total = row.reduce(function(s, v){ return s + v; }, 0), count = row[j];
    tip.textContent = 'true ' + d.labels[i] + ' → predicted ' + d.labels[j] + ': ' + count + ' of ' + total +
      ' image' + (total === 1 ? '' : 's') + (total ? ' (' + (100 * count / total).toFixed(1) + '%)' : '');
    tip.hidden = false;
    lit = [td.parentNode.cells[0], cm.tHead.rows[0].cells[j + 1]];
    lit.forEach(function(e){ e.classList.add('hl'); });
  });
  cm.addEventListener('mousemove', function(e){
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - 370) + 'px';
    tip.style.top = (e.clientY + 14) + 'px';
  });
  cm.addEventListener('mouseleave', clear);
})();
"""
