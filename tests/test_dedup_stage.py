"""The dedup stage on a synthetic run directory, against brute-force numpy; resumability."""

import json

import numpy as np
import pandas as pd
import pytest

import lvd.curate.dedup as dedup
from lvd.curate.config import load_config
from lvd.curate.manifest import write_part
from lvd.curate.stage import write_success
from lvd.index import ivf_join

DIM = 64


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_run(run_dir, rows, vectors, *, copy_vectors=None, copy_weights="/models/sscd.pt", parts=2, seed=0):
    """A run folder as the manifest and embed stages leave it (see the shared contracts).

    rows: dicts with id, set, sha1, width, height; vectors[i] belongs to rows[i].
    Rows and embedding parts are written in shuffled order: stages must join on id.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    manifest_rows = [
        {
            "id": r["id"],
            "set": r["set"],
            "source": "synthetic",
            "kind": "folder",
            "key": f"{r['id']}.jpg",
            "label": None,
            "bytes": 100,
            "sha1": r["sha1"],
            "width": r.get("width", 64),
            "height": r.get("height", 64),
            "format": "JPEG",
            "mode": "RGB",
            "frames": 1,
            "status": "ok",
            "error": None,
        }
        for r in (rows[i] for i in order)
    ]
    write_part(run_dir / "manifest" / "part-00000.parquet", manifest_rows)
    write_success(run_dir / "manifest")
    ids = np.array([rows[i]["id"] for i in order], np.int64)

    def write_embeddings(folder, vecs):
        vecs = np.asarray(vecs)[order]
        for p, chunk in enumerate(np.array_split(np.arange(len(ids)), parts)):
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"part-{p:05d}.npy", vecs[chunk].astype(np.float16))
            np.save(folder / f"ids-{p:05d}.npy", ids[chunk])

    write_embeddings(run_dir / "embed", vectors)
    copy_record = None
    if copy_vectors is not None:
        write_embeddings(run_dir / "embed" / "copy", copy_vectors)
        copy_record = {"kind": "torchscript", "weights": copy_weights, "dim": DIM}
    write_success(run_dir / "embed", model="synthetic", dim=DIM, copy_detection=copy_record)


def synthetic_pool(seed=0, n_pool=200, n_eval=20):
    """Random pool + planted exact copies, near-copy groups, chains and eval look-alikes."""
    rng = np.random.default_rng(seed)
    rows, vecs = [], []

    def add(id_, set_, vec, sha1=None, pixels=(64, 64), chain=-1):
        rows.append(
            {
                "id": id_,
                "set": set_,
                "sha1": sha1 or f"{id_:040x}",
                "width": pixels[0],
                "height": pixels[1],
                "chain": chain,
            }
        )
        vecs.append(vec)

    base = unit(rng.normal(size=(n_pool, DIM)))
    for i in range(n_pool):
        add(10_000 + 7 * i, "pool", base[i], pixels=(64 + i % 5, 64), chain=i if 60 <= i < 64 else -1)
    next_id = 50_000
    for i in range(0, 30, 3):  # exact copies: same bytes, same vector
        add(next_id, "pool", base[i], sha1=f"{10_000 + 7 * i:040x}")
        next_id += 1
    for i in range(30, 60, 2):  # near copies (1-3 of each), some larger than the original
        for j in range(1 + i % 3):
            add(next_id, "pool", unit(base[i] + rng.normal(scale=0.03, size=DIM)), pixels=(80 if j == 0 else 50, 64))
            next_id += 1
    for i in range(60, 64):  # a chain: each link close to the previous one only
        v = base[i]
        for _ in range(4):
            v = unit(v + rng.normal(scale=0.04, size=DIM))
            add(next_id, "pool", v, chain=i)
            next_id += 1
    evals = unit(rng.normal(size=(n_eval, DIM)))
    for j in range(n_eval):
        add(90_000 + j, f"eval:{'a' if j % 2 else 'b'}", evals[j])
    for j in range(0, n_eval, 4):  # pool images that are eval look-alikes
        add(next_id, "pool", unit(evals[j] + rng.normal(scale=0.05, size=DIM)))
        next_id += 1
    return rows, np.stack(vecs)


def config(run_dir, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "progress=false",
            "dedup.threshold=0.9",
            "decontam.threshold=0.85",
            "dedup.k=8",
            "embed.copy_detection.weights=null",
            *extra,
        ],
    )


def brute_force(rows, vecs, threshold, decontam_threshold):
    """Expected exact / near / decontam tables from first principles (all pairs, union-find)."""
    frame = pd.DataFrame(rows)
    frame["row"] = np.arange(len(frame))
    pool = frame[frame["set"] == "pool"].sort_values("id")
    first = pool.groupby("sha1")["id"].transform("min")
    exact = {int(i): int(f) for i, f in zip(pool["id"], first) if i != f}
    survivors = pool[~pool["id"].isin(exact)]
    x = vecs[survivors["row"].to_numpy()].astype(np.float16).astype(np.float32)  # what the stage reads
    sims = x @ x.T
    parent = list(range(len(x)))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(sims >= threshold, 1))):
        parent[find(a)] = find(b)
    roots = np.array([find(a) for a in range(len(x))])
    pixels = (survivors["width"] * survivors["height"]).to_numpy()
    ids = survivors["id"].to_numpy()
    kept = set()
    for r in np.unique(roots):
        members = np.flatnonzero(roots == r)
        best = max(members, key=lambda m: (pixels[m], -ids[m]))
        kept.add(int(ids[best]))
    evals = frame[frame["set"].str.startswith("eval:")]
    px = vecs[pool["row"].to_numpy()].astype(np.float16).astype(np.float32)
    ex = vecs[evals["row"].to_numpy()].astype(np.float16).astype(np.float32)
    s = px @ ex.T
    pairs = {
        (int(pool["id"].iloc[a]), evals["set"].iloc[b][5:], int(evals["id"].iloc[b]))
        for a, b in zip(*np.nonzero(s >= decontam_threshold))
    }
    return exact, ids, roots, kept, pairs


def same_partition(a, b):
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


@pytest.mark.parametrize("mode", ["knn", "semdedup", "join"])
def test_dedup_stage_matches_brute_force(tmp_path, monkeypatch, mode):
    """`join`: a memory budget too small for the rows in memory makes the stage join inverted lists
    (lists of 16 rows here, so that there are many) reading the parts group by group."""
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    extra = []
    if mode == "join":
        monkeypatch.setattr(ivf_join, "LIST_SIZE", 16)
        mode, extra = "knn", ["memory_gb=0.0001"]
    out = dedup.run_dedup(config(tmp_path, f"dedup.mode={mode}", "dedup.semdedup_clusters=4", *extra))
    how = json.loads((out / "_SUCCESS.json").read_text())["near_search"]
    if extra:
        assert (
            how["method"] == "ivf-join" and how["nlist"] > 10 and how["recall"] >= 0.999 and how["copy_recall"] >= 0.99
        ), how
    else:
        assert how["method"] == ("knn-graph" if mode == "knn" else "semdedup")
    exact_ref, ids, roots, kept, pairs = brute_force(rows, vecs, 0.9, 0.85)

    exact = pd.read_parquet(out / "exact.parquet")
    assert dict(zip(exact["id"], exact["dup_of"])) == exact_ref and len(exact_ref) == 10

    near = pd.read_parquet(out / "near.parquet").set_index("id").loc[ids]
    assert same_partition(near["component"].tolist(), roots.tolist())
    assert set(near.index[near["keep"]]) == kept
    assert (~near["keep"]).sum() > 20  # the planted near copies and chains were found
    # a chain whose ends are below the threshold is still one component (transitivity)
    chains = pd.DataFrame(rows).query("chain >= 0").groupby("chain")["id"].apply(list)
    for members in chains:
        assert near.loc[members, "component"].nunique() == 1 and near.loc[members, "keep"].sum() == 1
        first, last = vecs[[r["id"] for r in rows].index(members[0])], vecs[[r["id"] for r in rows].index(members[-1])]
        assert first @ last < 0.9

    decontam = pd.read_parquet(out / "decontam.parquet")
    assert set(zip(decontam["id"], decontam["eval_set"], decontam["eval_id"])) == pairs and len(pairs) >= 5
    assert (decontam["similarity"] >= 0.85).all()

    success = json.loads((out / "_SUCCESS.json").read_text())
    expected_kept = sorted(kept - {p[0] for p in pairs})
    assert success["pool_kept"] == len(expected_kept) and success["exact_duplicates"] == 10
    np.testing.assert_array_equal(dedup.curated_pool_ids(tmp_path), expected_kept)


def test_star_grouping_removes_only_direct_copies_of_kept_images(tmp_path):
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    # one SemDeDup cluster = every pair above the threshold, so the graph is exactly known
    out = dedup.run_dedup(config(tmp_path, "dedup.mode=semdedup", "dedup.semdedup_clusters=1", "dedup.grouping=star"))
    frame = pd.DataFrame(rows)
    pool = frame[frame["set"] == "pool"].sort_values("id")
    survivors = pool[~pool["id"].isin(pd.read_parquet(out / "exact.parquet")["id"])]
    x = vecs[survivors.index.to_numpy()].astype(np.float16).astype(np.float32)
    ids, pixels = survivors["id"].to_numpy(), (survivors["width"] * survivors["height"]).to_numpy()
    kept = []  # by definition: most pixels first, then lowest id; kept unless a kept image is >= 0.9
    for i in sorted(range(len(ids)), key=lambda i: (-pixels[i], ids[i])):
        if not kept or (x[kept] @ x[i]).max() < 0.9:
            kept.append(i)
    near = pd.read_parquet(out / "near.parquet").set_index("id").loc[ids]
    assert set(near.index[near["keep"]]) == set(ids[kept])
    for _, members in near.groupby("component"):
        keeper = x[ids.tolist().index(members.index[members["keep"]][0])]
        assert members["keep"].sum() == 1
        assert all(x[ids.tolist().index(m)] @ keeper >= 0.9 - 1e-6 for m in members.index)
    # a chain whose ends are below the threshold is not one group any more
    chains = frame.query("chain >= 0").groupby("chain")["id"].apply(list)
    assert all(near.loc[members, "keep"].sum() >= 2 for members in chains)


def test_copy_detection_embeddings_are_used_when_configured(tmp_path):
    rows, vecs = synthetic_pool()
    rng = np.random.default_rng(9)
    copy_vecs = unit(rng.normal(size=vecs.shape))  # unrelated space: no near duplicates at all
    write_run(tmp_path, rows, vecs, copy_vectors=copy_vecs)
    out = dedup.run_dedup(config(tmp_path, "embed.copy_detection.weights=/models/sscd.pt"))
    near = pd.read_parquet(out / "near.parquet")
    assert near["keep"].all()
    assert json.loads((out / "_SUCCESS.json").read_text())["embeddings"] == "embed/copy"


def test_rerun_skips_finished_files_and_redoes_changed_ones(tmp_path, monkeypatch):
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    out = dedup.run_dedup(config(tmp_path))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a finished part")

    # nothing changed: nothing is recomputed or rewritten
    monkeypatch.setattr(dedup, "exact_duplicates", boom)
    monkeypatch.setattr(dedup, "near_duplicates_knn", boom)
    monkeypatch.setattr(dedup, "contamination_pairs", boom)
    dedup.run_dedup(config(tmp_path))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps

    # a new decontamination threshold redoes that file only
    monkeypatch.undo()
    monkeypatch.setattr(dedup, "exact_duplicates", boom)
    monkeypatch.setattr(dedup, "near_duplicates_knn", boom)
    dedup.run_dedup(config(tmp_path, "decontam.threshold=0.95"))
    assert (out / "near.parquet").stat().st_mtime_ns == stamps["near.parquet"]
    assert (out / "decontam.parquet").stat().st_mtime_ns != stamps["decontam.parquet"]
    *_, pairs = brute_force(rows, vecs, 0.9, 0.95)
    decontam = pd.read_parquet(out / "decontam.parquet")
    assert set(zip(decontam["id"], decontam["eval_set"], decontam["eval_id"])) == pairs

    # overwrite=true recomputes everything
    monkeypatch.undo()
    calls = []
    real = dedup.exact_duplicates
    monkeypatch.setattr(dedup, "exact_duplicates", lambda *a: calls.append(1) or real(*a))
    dedup.run_dedup(config(tmp_path, "decontam.threshold=0.95", "overwrite=true"))
    assert calls == [1]


def test_killed_run_resumes_to_the_same_output(tmp_path, monkeypatch):
    rows, vecs = synthetic_pool()
    write_run(tmp_path / "a", rows, vecs)
    write_run(tmp_path / "b", rows, vecs)
    reference = dedup.run_dedup(config(tmp_path / "a"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dedup, "contamination_pairs", killed)
    with pytest.raises(KeyboardInterrupt):
        dedup.run_dedup(config(tmp_path / "b"))
    out = tmp_path / "b" / "dedup"
    assert not (out / "_SUCCESS.json").exists() and not (out / "decontam.parquet").exists()
    assert not list(out.glob(".*tmp*"))
    monkeypatch.undo()
    dedup.run_dedup(config(tmp_path / "b"))
    for name in ("exact.parquet", "near.parquet", "decontam.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(reference / name))


def test_missing_embeddings_is_an_error(tmp_path):
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    (tmp_path / "embed" / "_SUCCESS.json").unlink()
    with pytest.raises(FileNotFoundError, match="lvd embed"):
        dedup.run_dedup(config(tmp_path))


def test_single_image_pool_without_eval_sets(tmp_path):
    write_run(tmp_path, [{"id": 3, "set": "pool", "sha1": "a" * 40}], unit(np.ones((1, DIM))), parts=1)
    for mode in ("knn", "semdedup"):
        out = dedup.run_dedup(config(tmp_path, f"dedup.mode={mode}"))
        near = pd.read_parquet(out / "near.parquet")
        assert near["id"].tolist() == [3] and near["keep"].tolist() == [True]
        assert len(pd.read_parquet(out / "exact.parquet")) == 0 and len(pd.read_parquet(out / "decontam.parquet")) == 0
        np.testing.assert_array_equal(dedup.curated_pool_ids(tmp_path), [3])


def test_threshold_too_low_for_the_space_is_reported(tmp_path, caplog):
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    dedup.run_dedup(config(tmp_path, "dedup.threshold=-1", "decontam.threshold=-1"))
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "one near-duplicate component holds" in messages and "decontam:" in messages


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_full_disk_in_the_middle_leaves_the_finished_outputs_as_they_were(tmp_path, monkeypatch):
    import errno

    import lvd.curate.dedup as dedup_module

    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    dedup.run_dedup(config(tmp_path))
    before = _files(tmp_path / "dedup")
    real = dedup_module.write_frame
    calls = []

    def failing(path, *args, **kwargs):  # the second file of the new run hits a full disk
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dedup_module, "write_frame", failing)
    with pytest.raises(OSError, match="No space"):
        dedup.run_dedup(config(tmp_path, "dedup.threshold=0.8", "decontam.threshold=0.7"))
    assert len(calls) == 2 and _files(tmp_path / "dedup") == before  # nothing replaced, no temporary left


@pytest.mark.slow
def test_a_sigkill_in_the_middle_leaves_the_finished_outputs_as_they_were(tmp_path):
    import subprocess
    import sys

    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    dedup.run_dedup(config(tmp_path))
    before = _files(tmp_path / "dedup")
    script = f"""
import os, signal
import lvd.curate.dedup as dedup
from lvd.curate.config import load_config
real = dedup.write_frame
def write_then_die(path, *args, **kwargs):
    real(path, *args, **kwargs)
    if "near" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # one new file written, the next not yet
dedup.write_frame = write_then_die
dedup.run_dedup(load_config(None, ["run_dir={tmp_path}", "progress=false", "embed.copy_detection.weights=null",
                                   "dedup.threshold=0.8", "decontam.threshold=0.7", "dedup.k=8"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = _files(tmp_path / "dedup")
    assert {k: v for k, v in after.items() if ".tmp-" not in k} == before  # the killed run's temporaries aside
    dedup.run_dedup(config(tmp_path))  # and the next run clears them away
    assert _files(tmp_path / "dedup") == before


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["components", "star"])
def test_two_torchrun_ranks_dedup_like_one_process(tmp_path, grouping):
    """`python -m lvd.curate.dedup` under torchrun: 2 gloo ranks split the inverted lists and the
    decontamination blocks; near.parquet and decontam.parquet equal one process's, and brute force's."""
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    rows, vecs = synthetic_pool(n_pool=2600, n_eval=40)
    for name in ("one", "two"):
        write_run(tmp_path / name, rows, vecs)
    # a budget too small for the rows in memory: the list join (2600+ rows -> 5 lists), each rank its share
    settings = ("memory_gb=0.0002", f"dedup.grouping={grouping}")
    one = dedup.run_dedup(config(tmp_path / "one", *settings))
    config_file = tmp_path / "two.yaml"
    OmegaConf.save(config(tmp_path / "two", *settings), config_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lvd.curate.dedup",
        str(config_file),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2" in done.stderr  # both ranks joined lists
    two = tmp_path / "two" / "dedup"
    for name in ("exact.parquet", "near.parquet", "decontam.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(two / name), pd.read_parquet(one / name))
    success = json.loads((two / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["near_search"]["method"] == "ivf-join"
    assert success["near_search"]["nlist"] >= 4
    if grouping == "components":
        _, ids, roots, kept, pairs = brute_force(rows, vecs, 0.9, 0.85)
        near = pd.read_parquet(two / "near.parquet").set_index("id").loc[ids]
        assert same_partition(near["component"].tolist(), roots.tolist())
        decontam = pd.read_parquet(two / "decontam.parquet")
        assert set(zip(decontam["id"], decontam["eval_set"], decontam["eval_id"])) == pairs and len(pairs) >= 10


def _rewrite_manifest(run_dir, drop):
    """The manifest as an older lvd, or a person following the documented contract, writes it:
    plain parquet without the columns in `drop` and without lvd's metadata."""
    path = run_dir / "manifest" / "part-00000.parquet"
    frame = pd.read_parquet(path).drop(columns=list(drop))
    frame.to_parquet(path, index=False)


def test_a_manifest_without_the_format_column_is_read_with_defaults(tmp_path):
    """`format` (and kind, mode, frames, label, error, status) are optional: dedup reads such a
    manifest with their defaults and finds what brute force finds."""
    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    _rewrite_manifest(tmp_path, ["format", "kind", "mode", "frames", "label", "error", "status"])
    out = dedup.run_dedup(config(tmp_path))
    exact_ref, ids, roots, kept, pairs = brute_force(rows, vecs, 0.9, 0.85)
    exact = pd.read_parquet(out / "exact.parquet")
    assert dict(zip(exact["id"], exact["dup_of"])) == exact_ref
    near = pd.read_parquet(out / "near.parquet").set_index("id").loc[ids]
    assert same_partition(near["component"].tolist(), roots.tolist()) and set(near.index[near["keep"]]) == kept
    decontam = pd.read_parquet(out / "decontam.parquet")
    assert set(zip(decontam["id"], decontam["eval_set"], decontam["eval_id"])) == pairs


def test_a_manifest_without_a_required_column_is_refused_in_one_line(tmp_path):
    from lvd.common.errors import UserError

    rows, vecs = synthetic_pool()
    write_run(tmp_path, rows, vecs)
    _rewrite_manifest(tmp_path, ["sha1", "format"])
    with pytest.raises(UserError, match=r"no column \['sha1'\].*run `lvd manifest` again") as caught:
        dedup.run_dedup(config(tmp_path))
    assert "\n" not in str(caught.value) and not (tmp_path / "dedup" / "_SUCCESS.json").exists()
    (tmp_path / "manifest" / "part-00000.parquet").write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(UserError, match="cannot be read.*run `lvd manifest` again"):
        dedup.run_dedup(config(tmp_path))
