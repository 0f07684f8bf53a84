"""The report stage: one static HTML page that shows what every stage decided, with pictures.

A person should be able to check a curation run by looking: which images were merged as
duplicates, which pool images were dropped as copies of evaluation images, what the clusters
look like, and what each seed image pulled in. The page is plain HTML with thumbnails beside
it (report/img/), so it opens from disk, from a file server, or as a CI artifact.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from lvd.curate.config import save_config
from lvd.curate.manifest import read_manifest
from lvd.curate.runio import atomic_path, atomic_write_text, clear_success, read_success, write_success
from lvd.curate.sources import read_row_bytes

log = logging.getLogger(__name__)

STAGE = "report"
THUMB = 128
MAX_GROUPS = 24
MAX_CLUSTERS = 16
PER_CLUSTER = 10
MAX_SEEDS = 8
MAX_PAIRS = 24
MAX_QUARANTINED = 50

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin-top:0} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}
table.counts{border-collapse:collapse} table.counts td,table.counts th{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.counts td:first-child,table.counts th:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:8px 0 16px}
figure{margin:0;width:%dpx;font-size:11px;text-align:center}
figure img{width:%dpx;height:%dpx;object-fit:contain;background:#eee;display:block}
figure.seed img{outline:3px solid #2a7} figure.removed img{outline:3px solid #c33}
.label{font-size:13px;margin:12px 0 2px;color:#555}
.pair{display:flex;gap:6px;margin:6px 16px 6px 0;align-items:center}
.pairs{display:flex;flex-wrap:wrap}
svg text{font-size:10px}
""" % (THUMB, THUMB, THUMB)


class Thumbnails:
    """Writes each image's thumbnail once and hands out its relative path."""

    def __init__(self, folder: Path, manifest: pd.DataFrame, max_pixels: int | None):
        self.folder = folder
        self.rows = manifest.set_index("id")
        self.max_pixels = max_pixels
        self.done: dict[int, str | None] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, id_: int) -> str | None:
        id_ = int(id_)
        if id_ not in self.done:
            self.done[id_] = self._make(id_)
        return self.done[id_]

    def _make(self, id_: int) -> str | None:
        from lvd.pretrain.data.decode import decode

        if id_ not in self.rows.index:
            return None
        row = self.rows.loc[id_]
        name = f"{id_}.jpg"
        target = self.folder / name
        if not target.exists():
            try:
                img = decode(read_row_bytes(row["kind"], row["source"], row["key"]), max_pixels=self.max_pixels)
            except Exception as exc:  # a vanished source file must not stop the report
                log.warning("report: no thumbnail for %s: %s", id_, exc)
                return None
            img.thumbnail((THUMB, THUMB))
            with atomic_path(target) as tmp:
                img.save(tmp, "JPEG", quality=85)
        return f"img/{name}"


def _figure(thumbs: Thumbnails, id_, caption: str, cls: str = "") -> str:
    src = thumbs.path(id_)
    img = f'<img src="{html.escape(src)}" alt="{int(id_)}" loading="lazy">' if src else '<div style="width:128px;height:128px;background:#fdd">missing</div>'
    return f'<figure class="{cls}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _read(path: Path) -> pd.DataFrame | None:
    return pq.read_table(path).to_pandas() if path.is_file() else None


def _counts_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    return f'<table class="counts"><tr><th>what</th><th>count</th></tr>{body}</table>'


def histogram_svg(sizes: np.ndarray, bins: int = 30, width: int = 640, height: int = 160) -> str:
    """Cluster sizes as an inline SVG bar chart (no plotting library needed for 30 bars)."""
    if len(sizes) == 0:
        return "<p>no clusters</p>"
    counts, edges = np.histogram(sizes, bins=min(bins, max(1, len(np.unique(sizes)))))
    top = counts.max() or 1
    bar_w = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{height - 20 - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="#4a7"><title>{int(edges[i])}-{int(edges[i + 1])} images: {int(c)} clusters</title></rect>')
    axis = f'<text x="0" y="{height - 5}">{int(edges[0])} images</text><text x="{width - 80}" y="{height - 5}">{int(edges[-1])} images</text>'
    return f'<svg width="{width}" height="{height}" role="img" aria-label="cluster sizes">{"".join(bars)}{axis}</svg>'


def _section_counts(run_dir: Path, manifest: pd.DataFrame) -> str:
    rows = []
    for (set_name, status), n in manifest.groupby(["set", "status"]).size().items():
        rows.append((f"manifest {set_name} {status}", n))
    for stage in ("embed", "dedup", "cluster", "retrieve", "shards"):
        info = read_success(run_dir / stage)
        if info is None:
            rows.append((f"{stage}", "not run"))
            continue
        for key in ("rows", "images", "embedded", "exact_duplicates", "near_duplicates_removed", "decontaminated", "pool_kept", "clusters", "k", "distinct_images", "samples", "shards"):
            if key in info and not isinstance(info[key], (dict, list)):
                rows.append((f"{stage} {key.replace('_', ' ')}", info[key]))
    return "<h2>Counts per stage</h2>" + _counts_table(rows)


def _section_duplicates(run_dir: Path, thumbs: Thumbnails) -> str:
    near = _read(run_dir / "dedup" / "near.parquet")
    exact = _read(run_dir / "dedup" / "exact.parquet")
    parts = ["<h2>Duplicate groups</h2>"]
    if near is None:
        return parts[0] + "<p>dedup has not run.</p>"
    parts.append(_space_line(read_success(run_dir / "dedup")))
    sizes = near.groupby("component").size()
    groups = sizes[sizes > 1].sort_values(ascending=False, kind="stable")
    parts.append(f"<p>{len(groups)} near-duplicate groups ({int(groups.sum()) - len(groups)} images removed); {0 if exact is None else len(exact)} exact duplicates. Kept image outlined green, removed red.</p>")
    for component in groups.index[:MAX_GROUPS]:
        members = near[near.component == component].sort_values(["keep", "id"], ascending=[False, True])
        figs = [_figure(thumbs, r.id, _kept_caption(r) if r.keep else "removed", "seed" if r.keep else "removed")
                for r in members.head(12).itertuples()]
        parts.append(f'<div class="label">group {int(component)} · {len(members)} images</div><div class="row">{"".join(figs)}</div>')
    if exact is not None and len(exact):
        parts.append("<h3>Exact duplicates (same bytes)</h3>")
        for r in exact.head(MAX_GROUPS).itertuples():
            parts.append(f'<div class="pair">{_figure(thumbs, r.dup_of, f"kept {r.dup_of}", "seed")}{_figure(thumbs, r.id, f"removed {r.id}", "removed")}</div>')
    return "".join(parts)


def _kept_caption(row) -> str:
    """'kept' and, where near.parquet says, the keep rule's criterion that decided."""
    reason = getattr(row, "reason", None)
    return f"kept: {reason}" if isinstance(reason, str) and reason else "kept"


def _space_line(success: dict | None) -> str:
    """Where near-copies were judged and at which thresholds: a threshold means nothing without its space."""
    if not success or "space" not in success:
        return ""
    thresholds = success.get("thresholds") or {}
    shown = []
    for name in ("dedup", "decontam"):
        t = thresholds.get(name)
        if t:
            shown.append(f"{name} threshold {t['value']:.3g} ({html.escape(str(t['source']))})")
    return (f"<p>Judged in {html.escape(str(success['space'].get('description')))}: "
            f"{'; '.join(shown) or 'no thresholds'}.</p>")


def _section_decontam(run_dir: Path, thumbs: Thumbnails) -> str:
    pairs = _read(run_dir / "dedup" / "decontam.parquet")
    if pairs is None:
        return "<h2>Decontamination</h2><p>dedup has not run.</p>"
    pairs = pairs.sort_values("similarity", ascending=False, kind="stable")
    out = [f"<h2>Decontamination</h2><p>{pairs['id'].nunique()} pool images removed as near-copies of evaluation images ({len(pairs)} pairs). Pool image (removed) beside the evaluation image.</p><div class=\"pairs\">"]
    for r in pairs.head(MAX_PAIRS).itertuples():
        out.append(f'<div class="pair">{_figure(thumbs, r.id, f"pool {r.id}", "removed")}{_figure(thumbs, r.eval_id, f"{r.eval_set} · sim {r.similarity:.3f}")}</div>')
    return "".join(out) + "</div>"


def _section_clusters(run_dir: Path, thumbs: Thumbnails, seed: int) -> str:
    assign = _read(run_dir / "cluster" / "assign.parquet")
    if assign is None:
        return "<h2>Clusters</h2><p>cluster has not run.</p>"
    sizes = assign.groupby("cluster").size().sort_values(ascending=False, kind="stable")
    if sizes.empty:
        return "<h2>Clusters</h2><p>no pool image survived deduplication, so there are no clusters.</p>"
    out = [f"<h2>Clusters</h2><p>{len(sizes)} clusters; sizes from {sizes.min()} to {sizes.max()} (median {int(sizes.median())}).</p>", histogram_svg(sizes.to_numpy())]
    rng = np.random.default_rng(seed)
    shown = sizes.index[:MAX_CLUSTERS // 2].tolist() + sizes.index[-(MAX_CLUSTERS // 2):].tolist()
    for c in dict.fromkeys(shown):
        members = assign[assign.cluster == c].sort_values("distance", kind="stable")
        pick = members.head(PER_CLUSTER) if len(members) <= PER_CLUSTER else members.iloc[np.sort(rng.choice(len(members), PER_CLUSTER, replace=False))]
        figs = [_figure(thumbs, r.id, f"d {r.distance:.3f}") for r in pick.itertuples()]
        out.append(f'<div class="label">cluster {int(c)} · {len(members)} images</div><div class="row">{"".join(figs)}</div>')
    return "".join(out)


def _section_retrieval(run_dir: Path, thumbs: Thumbnails) -> str:
    neighbors = _read(run_dir / "retrieve" / "neighbors.parquet")
    if neighbors is None:
        return "<h2>Retrieval</h2><p>retrieve has not run.</p>"
    out = ["<h2>Retrieval per seed set</h2>"]
    floors = (read_success(run_dir / "retrieve") or {}).get("seed_sets") or {}
    for set_name, rows in neighbors.groupby("seed_set", sort=True):
        modes = ", ".join(sorted(rows["mode"].unique()))
        out.append(f"<h3>{html.escape(set_name)}</h3><p>{rows['id'].nunique()} distinct images from {rows['seed_id'].nunique()} seeds ({html.escape(modes)}).{_floor_line(floors.get(set_name))}</p>")
        for seed_id in sorted(rows["seed_id"].unique())[:MAX_SEEDS]:
            mine = rows[(rows.seed_id == seed_id) & (rows["mode"] != "seed")].sort_values(["rank", "id"]).head(10)
            figs = [_figure(thumbs, seed_id, f"seed {seed_id}", "seed")] + [_figure(thumbs, r.id, f"#{r.rank} sim {r.similarity:.3f}") for r in mine.itertuples()]
            out.append(f'<div class="row">{"".join(figs)}</div>')
    return "".join(out)


def _floor_line(info: dict | None) -> str:
    """The set's similarity floor(s) and what they rejected."""
    if not info or "min_similarity" not in info:
        return ""
    floors = {k: v for k, v in (info["min_similarity"] or {}).items() if v is not None}
    if not floors:
        return " No similarity floor: retrieved images get no label."
    shown = ", ".join(f"{html.escape(k if k != '*' else 'any label')} {v:.3f}" for k, v in sorted(floors.items()))
    return (f" Similarity floor ({html.escape(str(info.get('setting')))}): {shown}; it rejected "
            f"{info.get('rejected_by_floor', 0)} of {info.get('candidates', 0)} candidate images.")


def _section_quarantine(manifest_all: pd.DataFrame) -> str:
    bad = manifest_all[manifest_all.status != "ok"]
    rows = "".join(f"<tr><td>{html.escape(r.set)}</td><td>{html.escape(str(r.key))}</td><td>{html.escape(str(r.error))}</td></tr>" for r in bad.head(MAX_QUARANTINED).itertuples())
    return f'<h2>Quarantined inputs</h2><p>{len(bad)} inputs could not be used; the first {min(len(bad), MAX_QUARANTINED)}:</p><table class="counts"><tr><th>set</th><th>key</th><th>reason</th></tr>{rows}</table>'


# A small check the page runs on itself: how many thumbnails loaded (read by tests and people).
IMAGE_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = ok;
  document.getElementById('imgcheck').textContent = ok + ' of ' + imgs.length + ' pictures loaded';
});
</script>"""


def run_report(cfg) -> Path:
    """Write report/index.html and its thumbnails from whatever stages have finished."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    out = run_dir / STAGE
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    clear_success(out)
    manifest_all = read_manifest(run_dir, status=None)
    thumbs = Thumbnails(out / "img", manifest_all[manifest_all.status == "ok"], int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None)
    for stale in (out / "img").glob("*.jpg"):  # thumbnails are rewritten only when shown again
        stale.unlink()
    sections = [
        _section_counts(run_dir, manifest_all),
        _section_duplicates(run_dir, thumbs),
        _section_decontam(run_dir, thumbs),
        _section_clusters(run_dir, thumbs, int(cfg.seed)),
        _section_retrieval(run_dir, thumbs),
        _section_quarantine(manifest_all),
    ]
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>lvd report · {html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>lvd curation report</h1><p>run folder <code>{html.escape(str(run_dir.resolve()))}</code> · "
        f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · <span id=\"imgcheck\"></span></p>"
        + "".join(sections)
        + IMAGE_CHECK
        + "</body></html>"
    )
    atomic_write_text(out / "index.html", page)
    write_success(out, thumbnails=sum(1 for v in thumbs.done.values() if v), seconds=round(time.time() - started, 3))
    log.info("report: %s", out / "index.html")
    return out / "index.html"
