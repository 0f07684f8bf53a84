"""The report stage: one static HTML page that shows what every stage decided, with pictures.

A person should be able to check a curation run by looking: which images were merged as
duplicates, which pool images were dropped as copies of evaluation images, what the clusters
look like, and what each seed image pulled in. The readers below gather plain values from the
run folder; `templates/report.html` (Jinja2, autoescaped) lays them out. Thumbnails sit beside
the page (report/img/), so it opens from disk, from a file server, or as a CI artifact. Every
section that shows a part says so ("showing N of M") and links the parquet with all of it.
The page and its thumbnails are staged and committed by the stage runner (`curate.stage`); a
thumbnail already made (its name carries the image's sha1) is kept, not made again.
"""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from lvd.common.atomic import atomic_path, atomic_write_text
from lvd.common.row_bytes import RowReader
from lvd.common.run_folder import (
    QUARANTINED,
    balanced_ids,
    level_assignments,
    manifest_counts,
    read_frame,
    read_manifest,
    read_success,
)
from lvd.common.stages import STAGES
from lvd.curate.report_detect import read_detection_section
from lvd.curate.selection import level_table
from lvd.curate.stage import Stage, open_stage

log = logging.getLogger(__name__)

STAGE = "report"
THUMB = 128
MAX_GROUPS = 24
MAX_MEMBERS = 12
MAX_CLUSTERS = 16
PER_CLUSTER = 10
MAX_SEEDS = 8
PER_SEED = 10
MAX_PAIRS = 24
MAX_QUARANTINED = 50
COUNT_KEYS = (
    "rows",
    "images",
    "embedded",
    "exact_duplicates",
    "near_duplicates_removed",
    "decontaminated",
    "pool_kept",
    "clusters",
    "k",
    "distinct_images",
    "samples",
    "shards",
)


class Thumbnails:
    """Makes each image's thumbnail once (keeping those an earlier report made) and hands out its relative path."""

    def __init__(self, stage: Stage, manifest: pd.DataFrame, max_pixels: int | None, reader: RowReader):
        self.stage = stage
        self.rows = manifest.set_index("id")
        self.max_pixels = max_pixels
        self.done: dict[int, str | None] = {}
        self.reader = reader

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
        name = f"img/{id_}-{str(row['sha1'])[:12]}.jpg"  # by content too: a changed file gets a new thumbnail
        if (self.stage.folder / name).is_file():
            self.stage.keep(name)
            return name
        try:
            img = decode(self.reader.read(row["kind"], row["source"], row["key"]), max_pixels=self.max_pixels)
        except Exception as exc:  # a vanished source file must not stop the report
            log.warning("report: no thumbnail for %s: %s", id_, exc)
            return None
        img.thumbnail((THUMB, THUMB))
        with atomic_path(self.stage.path(name)) as tmp:
            img.save(tmp, "JPEG", quality=85)
        return name


class Figures:
    """One thumbnail with its caption lines: what the image is, and its file name.

    Figures are handed out first and filled in by `resolve` once every section has chosen its
    images: the manifest is then read for those images only (one filtered pass), not whole."""

    def __init__(self):
        self.made: list[dict] = []

    def __call__(self, id_, role: str, cls: str = "") -> dict:
        figure = {"id": int(id_), "src": None, "caption": [role], "cls": cls}
        self.made.append(figure)
        return figure

    def resolve(self, stage: Stage, max_pixels: int | None, reader: RowReader) -> Thumbnails:
        """Thumbnails and file names of every figure handed out (images not in the manifest get neither)."""
        ids = np.unique(np.array([f["id"] for f in self.made], np.int64))
        rows = read_manifest(stage.run_dir, ids=ids, columns=["id", "kind", "source", "key", "sha1"])
        thumbs = Thumbnails(stage, rows, max_pixels, reader)
        keys = dict(zip(rows["id"].astype(np.int64), rows["key"]))
        for figure in self.made:
            figure["src"] = thumbs.path(figure["id"])
            if figure["id"] in keys:
                figure["caption"].append(str(keys[figure["id"]]).rsplit("/", 1)[-1])
        return thumbs


def _read(path: Path) -> pd.DataFrame | None:
    return read_frame(path, optional=True)


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
        bars.append(
            f'<rect x="{i * bar_w:.1f}" y="{height - 20 - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
            f'fill="#4a7"><title>{int(edges[i])}-{int(edges[i + 1])} images: {int(c)} clusters</title></rect>'
        )
    axis = (
        f'<text x="0" y="{height - 5}">{int(edges[0])} images</text>'
        f'<text x="{width - 80}" y="{height - 5}">{int(edges[-1])} images</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="cluster sizes">{"".join(bars)}{axis}</svg>'


def read_counts(run_dir: Path) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        (f"manifest {s} {status}", n) for (s, status), n in manifest_counts(run_dir).items()
    ]
    for stage in ("embed", "dedup", "cluster", "retrieve", "shards"):
        info = read_success(run_dir / stage)
        if info is None:
            rows.append((stage, "not run"))
            continue
        rows += [
            (f"{stage} {key.replace('_', ' ')}", info[key])
            for key in COUNT_KEYS
            if key in info and not isinstance(info[key], (dict, list))
        ]
    return rows


def _space_line(success: dict | None) -> tuple[str | None, str]:
    """Where near-copies were judged and at which thresholds: a threshold means nothing without its space."""
    if not success or "space" not in success:
        return None, ""
    shown = [
        f"{name} threshold {t['value']:.3g} ({t['source']})"
        for name in ("dedup", "decontam")
        if (t := (success.get("thresholds") or {}).get(name))
    ]
    return str(success["space"].get("description")), "; ".join(shown)


def _kept_caption(row) -> str:
    """'kept' and, where near.parquet says, the keep rule's criterion that decided."""
    reason = getattr(row, "reason", None)
    return f"kept: {reason}" if isinstance(reason, str) and reason else "kept"


def read_duplicates(run_dir: Path, fig: Figures) -> dict | None:
    near = _read(run_dir / "dedup" / "near.parquet")
    if near is None:
        return None
    exact = _read(run_dir / "dedup" / "exact.parquet")
    sizes = near.groupby("component").size()
    groups = sizes[sizes > 1].sort_values(ascending=False, kind="stable")
    shown = []
    for component in groups.index[:MAX_GROUPS]:
        members = near[near.component == component].sort_values(["keep", "id"], ascending=[False, True])
        shown.append(
            {
                "component": int(component),
                "size": len(members),
                "members": [
                    fig(r.id, _kept_caption(r) if r.keep else "removed", "seed" if r.keep else "removed")
                    for r in members.head(MAX_MEMBERS).itertuples()
                ],
            }
        )
    space, thresholds = _space_line(read_success(run_dir / "dedup"))
    pairs = (
        []
        if exact is None
        else [
            (fig(r.dup_of, f"kept {r.dup_of}", "seed"), fig(r.id, f"removed {r.id}", "removed"))
            for r in exact.head(MAX_GROUPS).itertuples()
        ]
    )
    return {
        "space": space,
        "thresholds": thresholds,
        "n_groups": len(groups),
        "removed": int(groups.sum()) - len(groups),
        "groups": shown,
        "n_exact": 0 if exact is None else len(exact),
        "exact": pairs,
    }


def read_decontamination(run_dir: Path, fig: Figures) -> dict | None:
    pairs = _read(run_dir / "dedup" / "decontam.parquet")
    if pairs is None:
        return None
    pairs = pairs.sort_values("similarity", ascending=False, kind="stable")
    shown = [
        (fig(r.id, f"pool {r.id}", "removed"), fig(r.eval_id, f"{r.eval_set} · sim {r.similarity:.3f}"))
        for r in pairs.head(MAX_PAIRS).itertuples()
    ]
    return {"n_images": int(pairs["id"].nunique()), "n_pairs": len(pairs), "pairs": shown}


def read_clusters(run_dir: Path, fig: Figures, seed: int) -> dict | None:
    assign = _read(run_dir / "cluster" / "assign.parquet")
    if assign is None:
        return None
    sizes = assign.groupby("cluster").size().sort_values(ascending=False, kind="stable")
    if sizes.empty:
        return {"n": 0}
    rng = np.random.default_rng(seed)
    picked = dict.fromkeys(sizes.index[: MAX_CLUSTERS // 2].tolist() + sizes.index[-(MAX_CLUSTERS // 2) :].tolist())
    shown = []
    for c in picked:
        members = assign[assign.cluster == c].sort_values("distance", kind="stable")
        pick = (
            members
            if len(members) <= PER_CLUSTER
            else members.iloc[np.sort(rng.choice(len(members), PER_CLUSTER, replace=False))]
        )
        shown.append(
            {
                "cluster": int(c),
                "size": len(members),
                "members": [fig(r.id, f"d {r.distance:.3f}") for r in pick.itertuples()],
            }
        )
    return {
        "n": len(sizes),
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "median": int(sizes.median()),
        "svg": histogram_svg(sizes.to_numpy()),
        "shown": shown,
    }


def class_shares_svg(shares: dict[str, pd.Series], width: int = 720, height: int = 200) -> str:
    """Per-class shares (%) of several selections side by side, as an inline SVG bar chart."""
    colours = ("#999", "#58c", "#4a7", "#c84")
    classes = sorted(set().union(*(s.index for s in shares.values())), key=str)
    top = max((float(s.max()) for s in shares.values() if len(s)), default=1.0) or 1.0
    group_w = width / max(1, len(classes))
    bar_w = (group_w - 6) / max(1, len(shares))
    parts = []
    for i, cls in enumerate(classes):
        for j, (name, series) in enumerate(shares.items()):
            v = float(series.get(cls, 0.0))
            h = (height - 36) * v / top
            x = i * group_w + j * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{height - 36 - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                f'fill="{colours[j % len(colours)]}">'
                f"<title>{escape(str(cls))}, {escape(name)}: {v:.1f} %</title></rect>"
            )
        parts.append(f'<text x="{i * group_w:.1f}" y="{height - 22}" font-size="10">{escape(str(cls))[:12]}</text>')
    legend = "".join(
        f'<rect x="{k * 170}" y="{height - 14}" width="10" height="10" fill="{colours[k % len(colours)]}"/>'
        f'<text x="{k * 170 + 14}" y="{height - 5}" font-size="11">{escape(name)}</text>'
        for k, name in enumerate(shares)
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="class shares">{"".join(parts)}{legend}</svg>'


def read_balanced(run_dir: Path, seed: int) -> dict | None:
    """The balanced sample: cluster sizes at every level before and after it, and, where the pool's
    sources carry labels, the class shares of the pool, a random sample of the same size and it."""
    if not (run_dir / "cluster" / "balanced.parquet").is_file():
        return None
    picked = balanced_ids(run_dir)
    if len(picked) == 0:
        return None
    assignments = level_assignments(run_dir)
    levels = []
    for t, assign in enumerate(assignments, start=1):
        table = level_table(assign, picked)
        before, after = table["size"].to_numpy(), table["drawn"].to_numpy()
        levels.append(
            {
                "level": t,
                "clusters": len(table),
                "before": _spread(before),
                "after": _spread(after),
                "svg_before": histogram_svg(before),
                "svg_after": histogram_svg(after),
            }
        )
    pool_ids = assignments[0]["id"].to_numpy()
    labels = read_manifest(run_dir, ids=pool_ids, columns=["id", "label"]).set_index("id")["label"]
    out = {"n": len(picked), "pool": len(pool_ids), "levels": levels, "classes": None}
    pool_labels = labels.reindex(pool_ids)
    if pool_labels.notna().mean() >= 0.5:  # enough of the pool is labelled by its sources to be worth showing
        rng = np.random.default_rng(seed)
        random_ids = pool_ids[rng.choice(len(pool_ids), len(picked), replace=False)]
        selections = {"curated pool": pool_ids, "random sample": random_ids, "balanced sample": picked}
        shares = {name: (labels.reindex(ids).value_counts(normalize=True) * 100) for name, ids in selections.items()}
        rows = [
            {"label": str(c), **{name: float(v.get(c, 0.0)) for name, v in shares.items()}}
            for c in sorted(shares["curated pool"].index, key=lambda c: -shares["curated pool"][c])
        ]
        out["classes"] = {"svg": class_shares_svg(shares), "names": list(selections), "rows": rows}
    return out


def _spread(sizes: np.ndarray) -> dict:
    nonzero = sizes[sizes > 0]
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "median": float(np.median(sizes)),
        "ratio": float(nonzero.max() / nonzero.min()) if len(nonzero) else 0.0,
    }


def _floor_line(info: dict | None) -> str:
    """The set's similarity floor(s) and what they rejected."""
    if not info or "min_similarity" not in info:
        return ""
    floors = {k: v for k, v in (info["min_similarity"] or {}).items() if v is not None}
    if not floors:
        return "No similarity floor: retrieved images get no label."
    shown = ", ".join(f"{k if k != '*' else 'any label'} {v:.3f}" for k, v in sorted(floors.items()))
    return (
        f"Similarity floor ({info.get('setting')}): {shown}; it rejected {info.get('rejected_by_floor', 0)} of "
        f"{info.get('candidates', 0)} candidate images."
    )


def read_retrieval(run_dir: Path, fig: Figures) -> list[dict] | None:
    neighbors = _read(run_dir / "retrieve" / "neighbors.parquet")
    if neighbors is None:
        return None
    floors = (read_success(run_dir / "retrieve") or {}).get("seed_sets") or {}
    seeds = np.unique(neighbors["seed_id"].to_numpy(np.int64))
    labels = read_manifest(run_dir, ids=seeds, columns=["id", "label"]).set_index("id")["label"]
    out = []
    for set_name, rows in neighbors.groupby("seed_set", sort=True):
        seeds = sorted(rows["seed_id"].unique())
        shown = []
        for seed_id in seeds[:MAX_SEEDS]:
            label = labels.get(seed_id)
            role = f"seed {seed_id}" + (f" · {label}" if isinstance(label, str) else "")
            mine = rows[(rows.seed_id == seed_id) & (rows["mode"] != "seed")].sort_values(["rank", "id"]).head(PER_SEED)
            shown.append(
                [fig(seed_id, role, "seed")]
                + [fig(r.id, f"#{r.rank} sim {r.similarity:.3f}") for r in mine.itertuples()]
            )
        out.append(
            {
                "name": set_name,
                "n_images": int(rows["id"].nunique()),
                "n_seeds": len(seeds),
                "modes": ", ".join(sorted(rows["mode"].unique())),
                "floor": _floor_line(floors.get(set_name)),
                "seeds": shown,
            }
        )
    return out


def read_quarantine(run_dir: Path) -> dict:
    bad = read_manifest(run_dir, status=QUARANTINED, columns=["set", "source", "key", "error"])
    by_source = bad.groupby("source").size().sort_values(ascending=False, kind="stable")
    rows = [
        {"set": r.set, "source": r.source, "key": r.key, "error": r.error}
        for r in bad.head(MAX_QUARANTINED).itertuples()
    ]
    return {"total": len(bad), "by_source": [(str(k), int(v)) for k, v in by_source.items()], "rows": rows}


def render(context: dict) -> str:
    env = Environment(
        loader=PackageLoader("lvd.curate", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html").render(**context)


def run_report(cfg) -> Path:
    """Write report/index.html and its thumbnails from whatever stages have finished."""
    run_dir = Path(cfg.run_dir)
    max_pixels = int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None
    settings = {"seed": int(cfg.seed), "max_pixels": max_pixels}
    optional = [*(s for s in STAGES if s != STAGE), "detect"]
    with open_stage(cfg, STAGE, settings=settings, optional=optional) as stage:
        if stage.up_to_date:
            log.info("report: up to date")
            return stage.folder / "index.html"
        fig, reader = Figures(), RowReader()  # one reader: every picture of the report seeks into the same shards
        context = {
            "run_name": run_dir.name,
            "run_dir": str(run_dir.resolve()),
            "thumb": THUMB,
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "counts": read_counts(run_dir),
            "dup": read_duplicates(run_dir, fig),
            "decontam": read_decontamination(run_dir, fig),
            "clusters": read_clusters(run_dir, fig, int(cfg.seed)),
            "retrieval": read_retrieval(run_dir, fig),
            "balanced": read_balanced(run_dir, int(cfg.seed)),
            "quarantine": read_quarantine(run_dir),
            "detections": read_detection_section(cfg, stage, max_pixels, reader),
        }
        thumbs = fig.resolve(stage, max_pixels, reader)
        atomic_write_text(stage.path("index.html"), render(context))
        stage.commit(thumbnails=sum(1 for v in thumbs.done.values() if v))
    log.info("report: %s", stage.folder / "index.html")
    return stage.folder / "index.html"
