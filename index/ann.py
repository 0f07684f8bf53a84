"""Approximate nearest-neighbour indexes: choose, build, tune.

Vectors are L2-normalised embeddings compared by inner product (cosine). The choice among
Flat, IVF-Flat, IVF-PQ and HNSW follows the number of vectors, the dimension, a memory budget
and how clustered the data are (how much the IVF index built first must scan); the search
parameter (nprobe / efSearch / k_factor) is then *measured* on held-back vectors against exact
search, so the recall written in `info.json` is one we saw, not one we hope for.
Functions take arrays and return arrays (faiss `contrib` style); persistence is in `store.py`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
from tqdm.auto import tqdm

from lvd.common.errors import InputFormatError, MemoryBudgetError

log = logging.getLogger(__name__)

# Below this many vectors exact search is fast enough (a few ms per query on one core) and
# nothing approximate is worth its recall loss.
FLAT_MAX = 20_000
# IVF or HNSW is decided by how much of the data the built IVF index must scan to reach the
# target recall (its tuned nprobe / nlist, measured at full scale). Measured here on 50k x
# 128 clustered unit vectors, one thread: Faiss HNSW32 at recall 0.97 ran as fast as IVF
# scanning about 2k-3k full vectors per query, so IVF is chosen below this, HNSW above.
HNSW_EQUIVALENT_SCAN = 2500
# The coarse quantizer's scan of the nlist centroids runs as one matrix product per query
# batch, far cheaper per vector than scanning inverted lists; it counts at this weight.
QUANTIZER_WEIGHT = 0.25
HNSW_M = 32
# k-means wants this many training points per centroid to place them well (Faiss warns below 39).
TRAIN_POINTS_PER_LIST = 64
# Values tried, smallest first, when tuning the search parameter of each family.
NPROBE_CANDIDATES = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
EF_CANDIDATES = (10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
# Candidates re-ranked per result wanted, tried in turn, for indexes with a refine stage.
REFINE_K_FACTORS = (4, 8, 16, 32)


@dataclass
class IndexPlan:
    """What to build and why; saved in info.json."""

    factory: str
    family: str  # flat | ivf_flat | ivf_pq | hnsw | custom
    reason: str
    bytes_per_vector: float | None  # None for a factory string given by the user
    search_params: dict = field(default_factory=dict)
    train_size: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_bytes(text: str | int | float) -> int:
    """'8G', '512M', '1.5GiB', 1000 -> bytes (powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise InputFormatError(f"not a size: {text!r} (examples: 512M, 8G)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n): the usual balance of quantizer cost and list length."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    # never more lists than the data can train
    while nlist > 64 and nlist * TRAIN_POINTS_PER_LIST > n:
        nlist //= 2
    return int(max(nlist, 16))


def _pq_m(d: int, max_bytes: float) -> int:
    """Sub-quantizers of a 4-bit PQ: as many as the budget allows, each a divisor of d."""
    for m in sorted({m for m in range(1, d + 1) if d % m == 0 and m % 2 == 0}, reverse=True):
        if m / 2 <= max_bytes and m <= d:
            return m
    return 2


def choose_index(n: int, d: int, memory_budget: int, ivf_scan: float | None = None) -> IndexPlan:
    """Pick a family and its factory string for n vectors of dimension d within memory_budget bytes.

    `ivf_scan` is the fraction of the vectors the IVF index built for this data had to scan to
    reach the target recall (nprobe / nlist); when it is given and a graph fits the budget,
    data that IVF serves poorly (weakly clustered) gets HNSW instead.
    """
    raw = 4.0 * d
    per_vector_budget = memory_budget / max(n, 1)
    if n <= FLAT_MAX and raw <= per_vector_budget:
        return IndexPlan("Flat", "flat", f"n={n} <= {FLAT_MAX}: exact search is fast enough", raw)
    hnsw_bytes = raw + HNSW_M * 2 * 4 * 1.1
    nlist = _nlist_for(n)
    if ivf_scan is not None and hnsw_bytes <= per_vector_budget:
        scanned = ivf_scan * n + QUANTIZER_WEIGHT * nlist
        if scanned > HNSW_EQUIVALENT_SCAN:
            return IndexPlan(
                f"HNSW{HNSW_M},Flat",
                "hnsw",
                f"n={n}: IVF would scan ~{scanned:.0f} vectors per query for the target recall "
                f"(> {HNSW_EQUIVALENT_SCAN}); a graph is faster on this data",
                hnsw_bytes,
            )
    train = min(n, nlist * TRAIN_POINTS_PER_LIST)
    ivf_overhead = 8.0  # the id of each vector in its inverted list
    if raw + ivf_overhead <= per_vector_budget:
        probed = "" if ivf_scan is None else f"; IVF scans ~{ivf_scan * n:.0f} vectors per query"
        return IndexPlan(
            f"IVF{nlist},Flat",
            "ivf_flat",
            f"n={n}: inverted lists of full vectors fit the budget ({raw + ivf_overhead:.0f} B/vector){probed}",
            raw + ivf_overhead,
            train_size=train,
        )
    # Compressed: 4-bit PQ codes scanned with SIMD, re-ranked with 8-bit scalar codes when they fit.
    sq8 = float(d)
    if sq8 + 4 + ivf_overhead <= per_vector_budget:
        m = _pq_m(d, per_vector_budget - sq8 - ivf_overhead)
        factory = f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"
        bpv = m / 2 + sq8 + ivf_overhead
        why = "full vectors exceed the budget: 4-bit PQ scan, 8-bit re-rank"
    else:
        m = _pq_m(d, per_vector_budget - ivf_overhead)
        factory = f"IVF{nlist},PQ{m}x4fs"
        bpv = m / 2 + ivf_overhead
        why = "only PQ codes fit the budget; recall is limited by the code size"
    if bpv > per_vector_budget:
        raise MemoryBudgetError(
            f"{n} vectors of dimension {d} need at least {bpv * n / 2**20:.0f} MiB; "
            f"the memory budget is {memory_budget / 2**20:.0f} MiB"
        )
    return IndexPlan(factory, "ivf_pq", f"n={n}: {why} ({bpv:.0f} B/vector)", bpv, train_size=train)


def plan_from_factory(factory: str, n: int, d: int) -> IndexPlan:
    """An explicit Faiss factory string, checked by building it once."""
    try:
        probe = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:  # faiss raises RuntimeError with its own message
        raise InputFormatError(f"invalid Faiss factory string {factory!r}: {exc}") from None
    train = 0
    if not probe.is_trained:
        ivf = _ivf_of(probe)
        train = min(n, (ivf.nlist if ivf is not None else 1024) * TRAIN_POINTS_PER_LIST)
        train = max(train, min(n, 10_000))
    return IndexPlan(factory, "custom", "factory string given by the user", None, train_size=train)


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def new_index(plan: IndexPlan, d: int) -> faiss.Index:
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.family == "hnsw" or isinstance(index, faiss.IndexHNSW):
        faiss.downcast_index(index).hnsw.efConstruction = 200
    return index


def train_index(index: faiss.Index, sample: np.ndarray, device: str = "auto", seed: int = 0) -> faiss.Index:
    """Train on a sample; returns the trained CPU index.

    With a GPU Faiss build the whole training runs there. Otherwise, when torch sees a CUDA
    device (and `device` allows it), the coarse k-means of an IVF index runs on it through
    `index.kmeans` (torch backend) and Faiss trains only the rest (PQ / SQ codebooks).
    """
    if index.is_trained:
        return index
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    where = training_device(device)
    if where == "faiss-gpu":
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(sample)
        return faiss.index_gpu_to_cpu(gpu)
    if where.startswith("cuda") and _ivf_of(index) is not None:
        train_coarse_with_torch(index, sample, device=where, seed=seed)
    index.train(sample)
    return index


def training_device(device: str = "auto") -> str:
    """'faiss-gpu', a torch CUDA device string, or 'cpu': where training should run."""
    if device == "cpu":
        return "cpu"
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device != "auto":
        log.warning("device=%s asked for, but neither Faiss nor torch sees a GPU; training on the CPU", device)
    return "cpu"


def train_coarse_with_torch(
    index: faiss.Index, sample: np.ndarray, device: str, seed: int = 0, niter: int = 20
) -> None:
    """Place an IVF index's list centroids with torch k-means; `index.train` then skips that step.

    Spherical k-means, as Faiss itself does for inner-product IVF indexes.
    """
    from lvd.index.kmeans import kmeans

    ivf = _ivf_of(index)
    result = kmeans(
        sample,
        ivf.nlist,
        niter=niter,
        seed=seed,
        spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT,
        backend="torch",
        device=device,
    )
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(result.centroids, dtype=np.float32))


def add_batches(
    index: faiss.Index, batches: Iterable[np.ndarray], total: int | None = None, progress: bool | None = None
) -> faiss.Index:
    """Add vectors batch by batch (bounded memory), with a progress bar counted in vectors."""
    with tqdm(total=total, unit="vec", desc="add", disable=None if progress is None else not progress) as bar:
        for batch in batches:
            index.add(np.ascontiguousarray(batch, dtype=np.float32))
            bar.update(len(batch))
    return index


def set_search_params(index: faiss.Index, params: dict) -> None:
    """nprobe / efSearch / k_factor through Faiss's ParameterSpace (reaches wrapped indexes)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name == "k_factor":  # not reachable through ParameterSpace for Refine(...) indexes
            faiss.downcast_index(index).k_factor = float(value)
        else:
            space.set_index_parameter(index, name, value)


def tunable_parameter(index: faiss.Index) -> tuple[str, tuple[int, ...]] | None:
    """The one knob that trades speed for recall, and the values worth trying."""
    ivf = _ivf_of(index)
    if ivf is not None:
        return "nprobe", tuple(v for v in NPROBE_CANDIDATES if v <= ivf.nlist)
    base = index
    if isinstance(base, faiss.IndexRefine):
        base = faiss.downcast_index(base.base_index)
    if isinstance(faiss.downcast_index(base), faiss.IndexHNSW):
        return "efSearch", EF_CANDIDATES
    return None


def is_exact(index: faiss.Index) -> bool:
    """Brute-force indexes need no tuning: their recall is 1 by construction."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def exact_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (Faiss's blocked BLAS search): the reference for recall."""
    return faiss.knn(
        np.ascontiguousarray(xq, dtype=np.float32),
        np.ascontiguousarray(xb, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int | None = None) -> float:
    """Fraction of the true k nearest (ignoring -1 padding) found among the first k returned."""
    k = k or truth.shape[1]
    hits = total = 0
    for f, t in zip(found, truth):
        t = t[:k][t[:k] >= 0]
        hits += len(np.intersect1d(f[:k], t))
        total += len(t)
    return hits / total if total else 1.0


def tune(
    index: faiss.Index,
    xq: np.ndarray,
    truth: np.ndarray,
    k: int = 10,
    target: float = 0.95,
    labels: np.ndarray | None = None,
) -> tuple[dict, float]:
    """Cheapest search parameters reaching `target` recall@k of queries `xq` against `truth`.

    The queries must not be in the index (a graph index finds its own members' neighbours
    more easily than a new image's, so indexed queries overstate its recall). `labels[r]` is
    the label of index row r when `truth` holds labels (ids) rather than rows. Indexes with a
    refine stage also get the number of candidates re-ranked (k_factor), smallest first.
    Returns (params, recall); when nothing reaches the target the most thorough setting is
    kept, with a warning.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)

    def measure(params: dict) -> float:
        set_search_params(index, params)
        _, found = index.search(xq, k)
        if labels is not None:
            found = np.where(found >= 0, labels[np.maximum(found, 0)], -1)
        return recall_at_k(found, truth, k)

    knob = tunable_parameter(index)
    refine = (None,) if not isinstance(index, faiss.IndexRefine) else REFINE_K_FACTORS
    settings = []
    for k_factor in refine:
        base = {} if k_factor is None else {"k_factor": k_factor}
        settings.append([{**base, knob[0]: v} for v in knob[1]] if knob else [base])
    params, recall = {}, 0.0
    for candidates in settings:
        for params in candidates:
            recall = measure(params)
            if recall >= target:
                return params, recall
    if knob or refine != (None,):
        log.warning("recall@%d %.2f not reached; using %s (recall %.3f)", k, target, params, recall)
    return params, recall


def trained_index(
    plan: IndexPlan, d: int, sample: np.ndarray | None, device: str = "auto", seed: int = 0
) -> faiss.Index:
    """The planned index, empty, trained on `sample` when its family needs training."""
    index = new_index(plan, d)
    if not index.is_trained:
        if sample is None or len(sample) == 0:
            raise ValueError(f"{plan.factory} needs training vectors")
        log.info("training %s on %d vectors", plan.factory, len(sample))
        index = train_index(index, sample, device=device, seed=seed)
    return index


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted random row numbers (sorted so reads from memory-mapped parts stay sequential)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))
