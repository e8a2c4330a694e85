"""The report's data sections: likely label errors, near-duplicates and leaks, unfamiliar images, a map.

Same rules as the rest of report.html: everything inline, every name escaped (text in HTML
through `esc`, data for the script through `script_json`). The map is a canvas drawn by a
little script from a JSON block; hover thumbnails come from one JPEG atlas of small tiles,
so 10,000 points cost one image, not 10,000.
"""

from __future__ import annotations

import base64
import colorsys
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .data_issues import DataIssues
from .html_report import Thumbnails, esc, script_json

MAX_LABEL_ISSUES = 60
MAX_DUPLICATES = 40
MAX_UNFAMILIAR = 48
TILE_PX = 40  # hover thumbnails on the map
ATLAS_COLUMNS = 100


def headline_alerts(issues: DataIssues | None) -> list[str]:
    """HTML lines for the headline: leaks inflate accuracy, so they are said first."""
    if issues is None:
        return []
    if issues.not_inspected:
        return [f'<p class="note" id="data-summary">{esc(issues.summary())}</p>']
    leaked = issues.leaked_images()
    split = issues.scored_split
    alerts = []
    if leaked:
        alerts.append(f'<p class="alert" id="leak-alert"><b>{len(leaked)} {esc(split)} image'
                      f'{"s" if len(leaked) != 1 else ""} nearly duplicate{"" if len(leaked) != 1 else "s"} training '
                      f"images</b>: the accuracy above is inflated by them. See “Near-duplicates” below.</p>")
    alerts.append(f'<p class="note" id="data-summary">{esc(issues.summary())} (details in data_issues.json).</p>')
    return alerts


def data_sections(issues: DataIssues | None, labels: Sequence[str], thumbs: Thumbnails, image_root: Path | None) -> list[str]:
    if issues is None:
        return []
    if issues.not_inspected:
        return [f'<section id="data-not-inspected"><h2>Know your data</h2><p class="note">Not inspected: '
                f'{esc(issues.not_inspected)}.</p></section>']
    return [_label_issues_section(issues, thumbs), _duplicates_section(issues, thumbs),
            _unfamiliar_section(issues, thumbs), _map_section(issues, labels, image_root)]


def _gallery_section(title: str, counts: str, note: str, gallery_id: str, cards: Sequence[str], total: int,
                     shown: int, order: str = "") -> str:
    """One data-issue section: its heading and note, then its cards, saying when only the first are shown."""
    more = f" Showing {shown} of {total}{order}." if total > shown else ""
    gallery = f'<div class="gallery" id="{gallery_id}">{"".join(cards)}</div>' if cards else ""
    return f'<section><h2>{title} <small>{counts}</small></h2><p class="note">{esc(note)}{more}</p>{gallery}</section>'


def _image_card(thumbs: Thumbnails, image: str, caption: str) -> str:
    """One image's card: its thumbnail, then `caption` (HTML, already escaped) and its file name."""
    return (f'<figure class="card">{thumbs.tag(image)}<figcaption>{caption}'
            f'<div class="path" title="{esc(image)}">{esc(image)}</div></figcaption></figure>')


def _label_issues_section(issues: DataIssues, thumbs: Thumbnails) -> str:
    found = issues.label_issues
    method = issues.thresholds["label_issues"]
    note = (f"Train and validation images whose given label the features disagree with: confident learning (cleanlab) on "
            f"{method['folds']}-fold out-of-fold probabilities of a logistic-regression head, least likely label "
            "first. Check each photo and fix its folder; train again (nothing is re-extracted).")
    cards = [_image_card(thumbs, issue.image, f'<div>given: <s>{esc(issue.given)}</s></div><div>suggested: '
                                              f'<b>{esc(issue.suggested)}</b></div><div class="muted">score '
                                              f'{issue.score:.3f}</div>') for issue in found[:MAX_LABEL_ISSUES]]
    return _gallery_section("Likely label errors", str(len(found)), note, "label-issues", cards, len(found),
                            MAX_LABEL_ISSUES)


def _duplicates_section(issues: DataIssues, thumbs: Thumbnails) -> str:
    pairs = issues.near_duplicates
    threshold = issues.thresholds["duplicate_similarity"]
    note = (f"Pairs of images whose centred features have a cosine similarity of at least {threshold} (resized, "
            "re-encoded or lightly cropped copies, and burst shots of one scene), most similar first. A pair across "
            "splits (marked) lets the model be scored on what it trained on; a pair within one split weighs one "
            "photo twice.")
    ordered = sorted(pairs, key=lambda d: (not d.crosses_splits, -d.similarity))[:MAX_DUPLICATES]
    cards = []
    for pair in ordered:
        names = "".join(f'<li><span class="split">{esc(split)}</span> <span class="path" title="{esc(image)}">'
                        f"{esc(image)}</span></li>" for image, split in zip(pair.images, pair.splits))
        css = "card wide leak" if pair.crosses_splits else "card wide"
        badge = '<b class="bad">across splits</b> · ' if pair.crosses_splits else ""
        cards.append(f'<figure class="{css}"><div class="pair">{thumbs.tag(pair.images[0])}{thumbs.tag(pair.images[1])}'
                     f'</div><figcaption>{badge}similarity {pair.similarity:.3f}<ul>{names}</ul></figcaption></figure>')
    counts = f"{len(pairs)}, {sum(d.crosses_splits for d in pairs)} across splits" if pairs else "0"
    return _gallery_section("Near-duplicates", counts, note, "near-duplicates", cards, len(pairs), MAX_DUPLICATES,
                            ", pairs across splits first")


def _unfamiliar_section(issues: DataIssues, thumbs: Thumbnails) -> str:
    found = issues.unfamiliar
    method = issues.thresholds["unfamiliar"]
    note = (f"{issues.scored_split} images unlike the training data: {method['method']} above {method['threshold']:.4g}, "
            f"the {method['quantile_of_val']:.0%} quantile of the validation images' scores. `predict --unfamiliar` "
            "calls such images “unknown”. Most unlike first.")
    cards = [_image_card(thumbs, item.image, f'<div class="muted">score {item.score:.4g}</div>')
             for item in found[:MAX_UNFAMILIAR]]
    return _gallery_section("Unfamiliar images", str(len(found)), note, "unfamiliar", cards, len(found), MAX_UNFAMILIAR)


def class_colours(n: int) -> list[str]:
    """Distinct hues by the golden angle, in three lightness bands, so neighbours in the list differ."""
    colours = []
    for i in range(n):
        hue = (i * 0.381966) % 1.0
        lightness = (0.42, 0.58, 0.32)[i % 3]
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def _map_section(issues: DataIssues, labels: Sequence[str], image_root: Path | None) -> str:
    if issues.projection is None:
        return ""
    samples = issues.samples
    shown = [i for i in range(len(samples)) if np.isfinite(issues.projection[i]).all()]
    class_of = {label: i for i, label in enumerate(labels)}
    suspects = {issue.image for issue in issues.label_issues}
    unfamiliar = {item.image for item in issues.unfamiliar}
    splits = sorted({samples[i].split for i in shown})
    atlas_uri = _atlas([samples[i].image for i in shown], image_root)
    points = []
    for tile, i in enumerate(shown):
        sample = samples[i]
        flags = (1 if sample.image in suspects else 0) | (2 if sample.image in unfamiliar else 0)
        x, y = issues.projection[i]
        points.append([round(float(x), 4), round(float(y), 4), class_of.get(sample.label, -1), flags,
                       splits.index(sample.split), sample.image])
    data = {"labels": list(labels), "colours": class_colours(len(labels)), "splits": splits, "points": points,
            "tile": TILE_PX, "columns": ATLAS_COLUMNS, "atlas": atlas_uri is not None}
    legend = "".join(f'<button type="button" data-c="{k}"><i style="background:{colour}"></i>{esc(label)}</button>'
                     for k, (label, colour) in enumerate(zip(labels, data["colours"])))
    atlas = f'<img id="map-atlas" hidden alt="" src="{atlas_uri}">' if atlas_uri else ""
    sampled = (f" A random {len(shown)} of the {len(samples)} images are shown (inspect.map_points)."
               if len(shown) < len(samples) else "")
    note = (f"Every image of the run placed by t-SNE on its cached features (similar images land close together), "
            f"coloured by its given class. Ringed black: likely label errors; red square: unfamiliar. Hover a point "
            f"for its photo and name; click a class to pick it out.{sampled}")
    return (f'<section><h2>Map of the data <small>{len(shown)} images</small></h2><p class="note">{esc(note)}</p>'
            f'<div class="map-legend" id="map-legend">{legend}</div><div class="map-wrap">'
            f'<canvas id="map" width="960" height="640" aria-label="map of the images"></canvas></div>{atlas}'
            f'<script type="application/json" id="map-data">{script_json(data)}</script>'
            f"<style>{_MAP_CSS}</style><script>{_MAP_JS}</script></section>")


def _tile(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (TILE_PX, TILE_PX))
            picture = ImageOps.exif_transpose(image).convert("RGB")
            picture.thumbnail((TILE_PX, TILE_PX))
            return picture
    except Exception:  # an unreadable file only loses its hover thumbnail, never the report
        return None


def _atlas(images: Sequence[str], image_root: Path | None) -> str | None:
    """One JPEG of TILE_PX tiles, ATLAS_COLUMNS per row, in the order given; None without images."""
    if image_root is None or not images:
        return None
    rows = -(-len(images) // ATLAS_COLUMNS)
    sheet = Image.new("RGB", (TILE_PX * min(ATLAS_COLUMNS, len(images)), TILE_PX * rows), (241, 245, 249))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for k, tile in enumerate(pool.map(_tile, (image_root / image for image in images))):
            if tile is not None:
                x = (k % ATLAS_COLUMNS) * TILE_PX + (TILE_PX - tile.width) // 2
                y = (k // ATLAS_COLUMNS) * TILE_PX + (TILE_PX - tile.height) // 2
                sheet.paste(tile, (x, y))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_MAP_CSS = """
.alert{background:#fef2f2;border:1px solid #fca5a5;border-radius:8px;padding:8px 12px;margin:0 0 12px}
.card.leak{border-color:#fca5a5}.bad{color:var(--bad)}.split{font-size:11px;color:var(--muted)}
.pair{display:flex;gap:6px}.pair img,.pair .noimg{width:50%}
.map-wrap{position:relative;border:1px solid var(--line);border-radius:8px;overflow:hidden;max-width:960px}
#map{display:block;width:100%;height:auto;cursor:crosshair;background:#fff}
.map-legend{display:flex;flex-wrap:wrap;gap:4px 10px;max-height:120px;overflow:auto;margin:0 0 10px;font-size:12px}
.map-legend button{border:1px solid transparent;background:none;padding:1px 4px;border-radius:4px;cursor:pointer;
 font:inherit;color:inherit}
.map-legend button.on{border-color:var(--ink)}.map-legend i{display:inline-block;width:10px;height:10px;
 border-radius:50%;margin-right:4px;vertical-align:middle}
#tip canvas{display:block;margin:0 0 4px;border-radius:3px}
"""

_MAP_JS = """
(function(){
  var canvas = document.getElementById('map'), block = document.getElementById('map-data');
  if (!canvas || !block) return;
  var d = JSON.parse(block.textContent), ctx = canvas.getContext('2d');
  function tipBox(){ return document.getElementById('tip'); }  // after <main>: not parsed yet when this runs
  var atlas = document.getElementById('map-atlas'), picked = -1, pad = 14;
  var W = canvas.width, H = canvas.height;
  function px(p){ return [pad + p[0] * (W - 2 * pad), pad + (1 - p[1]) * (H - 2 * pad)]; }
  function draw(){
    ctx.clearRect(0, 0, W, H);
    var order = d.points.map(function(p, i){ return i; });
    if (picked >= 0) order.sort(function(a, b){ return (d.points[a][2] === picked) - (d.points[b][2] === picked); });
    order.forEach(function(i){
      var p = d.points[i], xy = px(p), on = picked < 0 || p[2] === picked;
      ctx.globalAlpha = on ? 0.85 : 0.08;
      ctx.fillStyle = p[2] >= 0 ? d.colours[p[2]] : '#9ca3af';
      ctx.beginPath(); ctx.arc(xy[0], xy[1], 3, 0, 2 * Math.PI); ctx.fill();
      ctx.globalAlpha = on ? 1 : 0.15;
      if (p[3] & 1){ ctx.strokeStyle = '#111827'; ctx.lineWidth = 1.5; ctx.beginPath();
        ctx.arc(xy[0], xy[1], 6, 0, 2 * Math.PI); ctx.stroke(); }
      if (p[3] & 2){ ctx.strokeStyle = '#dc2626'; ctx.lineWidth = 1.5; ctx.strokeRect(xy[0] - 6, xy[1] - 6, 12, 12); }
    });
    ctx.globalAlpha = 1;
  }
  function nearest(e){
    var r = canvas.getBoundingClientRect(), sx = W / r.width, sy = H / r.height;
    var x = (e.clientX - r.left) * sx, y = (e.clientY - r.top) * sy, best = -1, bestD = 64;
    d.points.forEach(function(p, i){
      if (picked >= 0 && p[2] !== picked) return;
      var xy = px(p), dd = (xy[0] - x) * (xy[0] - x) + (xy[1] - y) * (xy[1] - y);
      if (dd < bestD){ bestD = dd; best = i; }
    });
    return best;
  }
  canvas.addEventListener('mousemove', function(e){
    var i = nearest(e), tip = tipBox();
    if (i < 0){ tip.hidden = true; return; }
    var p = d.points[i];
    tip.textContent = '';
    if (d.atlas && atlas && atlas.complete){
      var thumb = document.createElement('canvas'); thumb.width = d.tile * 2; thumb.height = d.tile * 2;
      thumb.getContext('2d').drawImage(atlas, (i % d.columns) * d.tile, Math.floor(i / d.columns) * d.tile,
        d.tile, d.tile, 0, 0, d.tile * 2, d.tile * 2);
      tip.appendChild(thumb);
    }
    var lines = [p[5], (p[2] >= 0 ? d.labels[p[2]] : 'unlabeled') + ' · ' + d.splits[p[4]]];
    if (p[3] & 1) lines.push('likely label error');
    if (p[3] & 2) lines.push('unfamiliar');
    lines.forEach(function(t){ var div = document.createElement('div'); div.textContent = t; tip.appendChild(div); });
    tip.hidden = false;
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - 370) + 'px';
    tip.style.top = (e.clientY + 14) + 'px';
  });
  canvas.addEventListener('mouseleave', function(){ tipBox().hidden = true; });
  document.querySelectorAll('#map-legend button').forEach(function(b){
    b.addEventListener('click', function(){
      var c = +b.dataset.c;
      picked = picked === c ? -1 : c;
      document.querySelectorAll('#map-legend button').forEach(function(o){
        o.classList.toggle('on', +o.dataset.c === picked); });
      draw();
    });
  });
  draw();
})();
"""
