"""Two vector engines behind one interface: Faiss and pure torch.

Both answer the same two questions, arrays in and arrays out (numpy float32 / int64):

* `search(xb, xq, k, metric)` -> (D, I): the k best base rows for every query. Metric "ip"
  ranks by inner product (cosine on L2-normalised rows), D descending; metric "l2" ranks by
  squared Euclidean distance, D ascending (Faiss's conventions). Missing neighbours (k larger
  than the base) are id -1 with D = -inf ("ip") or +inf ("l2").
* `assign(x, centroids)` -> (D, I): nearest centroid and its squared distance (k-means E-step).

The torch backend is chunked matmul + top-k, so memory stays bounded and it runs on any torch
device; on a CPU the top-k of a long score block is a partial selection (`select_top`) that
reads the block once and never sorts it. In bf16 (or tf32) it only *proposes* candidates:
they are re-scored in fp32 and a row is accepted only when a rounding-error bound proves no
row outside the candidates can beat the k-th re-scored one; rows that fail the proof are
recomputed in fp32. Results are therefore those of an fp32 search whatever the dtype, which
is what lets the fast units be used for dedup and k-means, where a wrong neighbour changes
the output.
"""

from __future__ import annotations

import abc
import contextlib
import logging

import numpy as np
import torch

from lvd.common.devices import resolve_device, resolve_dtype
from lvd.common.errors import InputFormatError

log = logging.getLogger(__name__)

METRICS = ("ip", "l2")
DTYPES = ("fp32", "tf32", "bf16")
_DTYPE_ALIASES = {"float32": "fp32", "fp32": "fp32", "tf32": "tf32", "bfloat16": "bf16", "bf16": "bf16", "auto": "auto"}
# Unit roundoff of the storage formats the candidates are computed in (round to nearest);
# tf32 is given truncation's bound because tensor cores are not documented to round.
_ROUNDOFF = {"bf16": 2.0**-8, "tf32": 2.0**-10}
_FP32_ROUNDOFF = 2.0**-24
# Bytes of scores one matmul block may hold (rows x columns x 4): on a CPU a block that stays
# near the caches is faster (measured: 64 MiB beat 256 and 16); a GPU wants big launches.
DEFAULT_BLOCK_BYTES = {"cpu": 64 << 20, "other": 256 << 20}
# Partial selection (`select_top`): columns per group, and how many groups per wanted entry a
# row needs before grouping pays; rows shorter than SELECT_MIN_COLUMNS go to torch.topk whole.
# (Measured on 2-core AVX2, 335 x 50000 blocks: 8 and 4 beat 4 or 16 and 2 or 8 for k = 64 to 192.)
SELECT_GROUP = 8
SELECT_GROUPS_PER_ENTRY = 4
SELECT_MIN_COLUMNS = 4096
# A row whose low-precision candidates fail the proof is searched again in low precision with
# this many times the candidates before it is recomputed in fp32.
RETRY_FACTOR = 4


def engine_dtype(dtype: str, device: torch.device) -> str:
    """The torch backend's product format: lvd's one dtype rule (`resolve_dtype`) in the backend's
    names, plus tf32 (fp32 storage, tensor-core products), which exists on CUDA only."""
    if dtype not in _DTYPE_ALIASES:
        raise InputFormatError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(DTYPES)}")
    dtype = _DTYPE_ALIASES[dtype]
    if dtype == "tf32":
        if device.type == "cuda":
            return "tf32"
        log.info("tf32 exists only on CUDA devices; computing in fp32 on %s", device)
        return "fp32"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_dtype(dtype, device)]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _as_f32(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    return x


def _empty_result(nq: int, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    fill = -np.inf if metric == "ip" else np.inf
    return np.full((nq, k), fill, np.float32), np.full((nq, k), -1, np.int64)


class VectorBackend(abc.ABC):
    """What k-NN graphs, retrieval and k-means need from a vector engine."""

    name: str = ""

    @abc.abstractmethod
    def search(self, xb, xq, k: int, *, metric: str = "ip", exclude_self: bool = False):
        """(D, I) of the k best rows of `xb` for each row of `xq`.

        `exclude_self=True` means xq is xb (a k-NN graph): query i never returns base row i.
        """

    @staticmethod
    def _prepare(xb, xq, k: int, metric: str, exclude_self: bool):
        """Checked float32 inputs, the k that can be filled, and the (D, I) result to fill."""
        _check_metric(metric)
        xb, xq = _as_f32(xb), _as_f32(xq)
        if exclude_self and xb.shape != xq.shape:
            raise ValueError("exclude_self needs the queries to be the base itself")
        kk = min(k, len(xb) - (1 if exclude_self else 0))
        D, I = _empty_result(len(xq), k, metric)
        return xb, xq, kk, D, I

    def assign(self, x, centroids) -> tuple[np.ndarray, np.ndarray]:
        """(squared distance [n], index [n]) of the nearest centroid of every row of x."""
        distance, index = self.search(centroids, x, 1, metric="l2")
        return distance[:, 0], index[:, 0]


class FaissBackend(VectorBackend):
    """Exact search with Faiss flat indexes; on a GPU when the Faiss build has one."""

    name = "faiss"

    def __init__(self, device: str | torch.device = "cpu", query_batch: int = 65536):
        import faiss

        self.faiss = faiss
        self.device = resolve_device(device)
        self.query_batch = int(query_batch)
        self.use_gpu = self.device.type == "cuda" and _faiss_has_gpu()
        if self.device.type == "cuda" and not self.use_gpu:
            log.warning("this Faiss build has no GPU support; the faiss backend runs on the CPU")
        self._gpu_resources = None

    def _flat_index(self, xb: np.ndarray, metric: str):
        faiss = self.faiss
        index = faiss.IndexFlatIP(xb.shape[1]) if metric == "ip" else faiss.IndexFlatL2(xb.shape[1])
        if self.use_gpu:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
        index.add(xb)
        return index

    def search(self, xb, xq, k: int, *, metric: str = "ip", exclude_self: bool = False):
        xb, xq, kk, D, I = self._prepare(xb, xq, k, metric, exclude_self)
        if kk <= 0 or len(xq) == 0:
            return D, I
        index = self._flat_index(xb, metric)
        extra = 1 if exclude_self else 0
        for start in range(0, len(xq), self.query_batch):
            stop = min(start + self.query_batch, len(xq))
            d, i = index.search(xq[start:stop], kk + extra)
            if exclude_self:
                d, i = _drop_self(d, i, np.arange(start, stop))
            D[start:stop, :kk], I[start:stop, :kk] = d, i
        return D, I


def _drop_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id from a (k+1)-wide result, else its last column."""
    is_self = i == rows[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # Several self hits cannot happen (ids are unique), so exactly one column goes per row.
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(rows)), first] = False
    k = i.shape[1] - 1
    return d[keep].reshape(-1, k), i[keep].reshape(-1, k)


class TorchBackend(VectorBackend):
    """Chunked matmul + top-k on any torch device, fp32 results whatever the compute dtype."""

    name = "torch"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        block_bytes: int | None = None,
        extra_candidates: int | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = engine_dtype(dtype, self.device)
        if block_bytes is None:
            block_bytes = DEFAULT_BLOCK_BYTES["cpu" if self.device.type == "cpu" else "other"]
        self.block_bytes = int(block_bytes)
        self.extra_candidates = extra_candidates
        #: k-NN graphs from half the score matrix (each pair scored once). Off on CPUs: there the
        #: transpose it needs cost more than the half product it saves (measured, 2-core AVX2).
        self.half_matrix = self.device.type != "cpu"
        #: rows per block of the k-NN graph's half-matrix sweep
        self.graph_rows = 4096
        self._fp32_out = None  # whether torch.mm(..., out_dtype=float32) works here (probed once)
        #: rows of the last search whose low-precision candidates were not proven at first and
        #: were searched again with more candidates, and those then recomputed in fp32
        self.last_retry_rows = 0
        self.last_fallback_rows = 0

    # -- public --------------------------------------------------------------------------
    def search(self, xb, xq, k: int, *, metric: str = "ip", exclude_self: bool = False):
        xb, xq, kk, D, I = self._prepare(xb, xq, k, metric, exclude_self)
        if kk <= 0 or len(xq) == 0:
            return D, I
        base = torch.from_numpy(xb).to(self.device)
        queries = base if exclude_self else torch.from_numpy(xq).to(self.device)
        bias = -0.5 * _sq_norms(base) if metric == "l2" else None
        self.last_retry_rows = self.last_fallback_rows = 0
        lowp = None if self.dtype == "fp32" else _LowPrecision(base, self.dtype)
        if exclude_self and self.half_matrix:
            chunks = [(0, *self._graph(base, bias, kk, lowp))]
        else:
            chunks = self._query_chunks(queries, base, bias, kk, lowp, exclude_self)
        for start, scores, index in chunks:
            if metric == "l2":
                q = queries[start : start + len(scores)]
                scores = (_sq_norms(q)[:, None] - 2 * scores).clamp_min_(0)
            D[start : start + len(scores), :kk] = scores.cpu().numpy()
            I[start : start + len(scores), :kk] = index.cpu().numpy()
        return D, I

    def _query_chunks(self, queries, base, bias, k, lowp, exclude_self=False):
        """(first row, scores, ids) for successive chunks of queries against the whole base."""
        rows_per_chunk = max(1, self.block_bytes // (4 * self._block_cols(len(base))))
        for start in range(0, len(queries), rows_per_chunk):
            q = queries[start : start + rows_per_chunk]
            own = torch.arange(start, start + len(q), device=q.device) if exclude_self else None
            if lowp is None:
                yield (start, *self._topk(q, base, bias, k, own, self._mm_fp32))
            else:
                yield (start, *self._certified_topk(q, base, bias, k, own, lowp))

    def _graph(self, base, bias, k, lowp):
        """Top-k of every row among the other rows, from one half of the score matrix."""
        if lowp is None:
            return self._symmetric_topk(base, bias, k, self._mm_fp32)
        n = len(base)
        m = min(n - 1, k + self._extra(k))
        approx, cand = self._symmetric_topk(lowp.base, bias, m, self._mm_lowp)
        best_s = torch.empty((n, k), device=base.device)
        best_i = torch.empty((n, k), dtype=torch.int64, device=base.device)
        step = max(1, self.block_bytes // (4 * base.shape[1] * m))
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            own = torch.arange(r0, r1, device=base.device)
            best_s[r0:r1], best_i[r0:r1] = self._prove(
                base[r0:r1], base, bias, k, own, approx[r0:r1], cand[r0:r1], lowp, n - 1
            )
        return best_s, best_i

    def _symmetric_topk(self, base, bias, k, matmul):
        """Exact top-k over the other rows, computing each pair's score once.

        Row block I meets column blocks J >= I; one product gives I's candidates among J
        (row-wise top-k) and J's among I (column-wise top-k), merged into running results.
        """
        n = len(base)
        rows = min(n, self.graph_rows)
        cols = max(rows, self.block_bytes // (4 * rows) // rows * rows)
        best_s = torch.full((n, k), -torch.inf, device=base.device)
        best_i = torch.full((n, k), -1, dtype=torch.int64, device=base.device)
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            for j0 in range(i0, n, cols):
                j1 = min(j0 + cols, n)
                g = matmul(base[i0:i1], base[j0:j1]).float()
                s = g if bias is None else g + bias[j0:j1]
                if j0 == i0:
                    diag = torch.arange(min(i1 - i0, j1 - j0), device=base.device)
                    s[diag, diag] = -torch.inf
                v, j = select_top(s, min(k, j1 - j0))
                _merge_into(best_s, best_i, i0, v, j + j0)
                c0 = max(j0, i1)  # columns inside block I were rows of this block: done above
                if c0 < j1:
                    t = g[:, c0 - j0 :].T
                    t = t.contiguous() if bias is None else t + bias[i0:i1]
                    v, j = select_top(t, min(k, i1 - i0))
                    _merge_into(best_s, best_i, c0, v, j + i0)
        return best_s, best_i

    # -- building blocks -------------------------------------------------------------------
    def _block_cols(self, n: int) -> int:
        return min(n, 1 << 17)

    def _mm_fp32(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            # numpy's OpenBLAS: about 25% more fp32 throughput than torch's MKL on the AMD CPUs
            # this was measured on (MKL takes a generic path off Intel); same result layout.
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))
        return a @ b.T

    def _topk(self, q, base, bias, k, own, matmul):
        """Exact top-k of `matmul(q, base) + bias` over column blocks, merged as it goes.

        `own` (or None) holds, per query row, a base column it must never return (itself).
        """
        best_s = best_i = None
        step = self._block_cols(len(base))
        for c0 in range(0, len(base), step):
            c1 = min(c0 + step, len(base))
            s = matmul(q, base[c0:c1])
            if bias is not None:
                s = s.float() + bias[c0:c1]
            if own is not None:
                _mask_columns(s, own - c0)
            v, j = select_top(s, min(k, c1 - c0))
            v = v.float()  # a low-precision block is selected in its own format; its winners leave as fp32
            j += c0
            if best_s is None:
                best_s, best_i = v, j
            else:
                merged_s, pos = torch.topk(torch.cat([best_s, v], 1), k, dim=1)
                best_i = torch.gather(torch.cat([best_i, j], 1), 1, pos)
                best_s = merged_s
        return best_s, best_i

    def _mm_lowp(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Low-precision product: fp32 output where the device allows, else the bf16 block itself
        (selected in bf16; only the chosen entries are converted, and the bound counts the
        output rounding)."""
        if self.dtype == "tf32":
            with _allow_tf32():
                return a @ b.T
        if self._fp32_output():
            return torch.mm(a, b.T, out_dtype=torch.float32)
        return a @ b.T

    def _fp32_output(self) -> bool:
        """Whether low-precision products come back in fp32 here (tf32 always; bf16 where torch
        has `mm(..., out_dtype=float32)` for the device: CUDA, not CPUs)."""
        if self.dtype == "tf32":
            return True
        if self._fp32_out is None:
            one = torch.ones((1, 1), dtype=torch.bfloat16, device=self.device)
            try:
                torch.mm(one, one, out_dtype=torch.float32)
                self._fp32_out = True
            except (RuntimeError, TypeError, NotImplementedError):
                self._fp32_out = False
        return self._fp32_out

    def _extra(self, k: int) -> int:
        return self.extra_candidates if self.extra_candidates is not None else max(8, k)

    def _certified_topk(self, q, base, bias, k, own, lowp: _LowPrecision, m: int | None = None, retry: bool = True):
        n_avail = len(base) - (1 if own is not None else 0)
        m = min(n_avail, m or k + self._extra(k))
        q_low, _ = lowp.convert(q)
        approx, cand = self._topk(q_low, lowp.base, bias, m, own, self._mm_lowp)
        return self._prove(q, base, bias, k, own, approx, cand, lowp, n_avail, retry)

    def _prove(self, q, base, bias, k, own, approx, cand, lowp: _LowPrecision, n_avail, retry=True):
        """Exact top-k from low-precision candidates; rows the bound cannot clear are searched
        again in low precision with RETRY_FACTOR times the candidates (near-ties: a row with
        many near-copies), and those that still fail in fp32."""
        exact = _rescore(q, base, cand)
        if bias is not None:
            exact += bias[cand]
        best_s, pos = torch.topk(exact, k, dim=1)
        best_i = torch.gather(cand, 1, pos)
        m = cand.shape[1]
        if m == n_avail:
            return best_s, best_i  # every row was a candidate: nothing to prove
        # Any non-candidate has an approximate score <= the m-th one, hence an exact score
        # <= that + bound; the k-th re-scored score must clear it.
        q_low, q_res = lowp.convert(q)
        last = approx[:, -1]
        bound = lowp.error_bound(
            q_low.float().norm(dim=1), q_res, last, fp32_output=self._fp32_output(), biased=bias is not None
        )
        proven = best_s[:, -1] >= last + bound
        if not bool(proven.all()):
            redo = torch.nonzero(~proven).squeeze(1)
            own_redo = None if own is None else own[redo]
            if retry and RETRY_FACTOR * m < n_avail:
                self.last_retry_rows += int(redo.numel())
                s, i = self._certified_topk(q[redo], base, bias, k, own_redo, lowp, RETRY_FACTOR * m, retry=False)
            else:
                self.last_fallback_rows += int(redo.numel())
                s, i = self._topk(q[redo], base, bias, k, own_redo, self._mm_fp32)
            best_s[redo], best_i[redo] = s, i
        return best_s, best_i


# Bytes of gathered candidate rows re-scored at once: small enough to stay in the caches and
# to be reused by the allocator (one gather of a whole chunk's candidates touched ~44 GiB of
# fresh pages over a k-means run: 11.5M page faults, 22 s of system time).
RESCORE_BLOCK_BYTES = 8 << 20


def _rescore(q: torch.Tensor, base: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """fp32 q[r] . base[cand[r, j]] for every (r, j), a block of rows at a time."""
    rows, m = cand.shape
    d = base.shape[1]
    out = torch.empty((rows, m), dtype=torch.float32, device=q.device)
    step = max(1, RESCORE_BLOCK_BYTES // max(1, 4 * m * d))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        gathered = torch.index_select(base, 0, cand[r0:r1].reshape(-1)).view(r1 - r0, m, d)
        out[r0:r1] = torch.bmm(gathered, q[r0:r1].unsqueeze(2)).squeeze(2)
    return out


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row (one fused pass, no temporary the size of x)."""
    return torch.linalg.vector_norm(x, dim=1).square()


def select_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, column ids) of the k largest entries of each row, values descending, as
    torch.topk gives them (the order among equal values aside), but cheaper on a CPU for rows
    much longer than k.

    The columns fall into SELECT_GROUP strided groups (column c in group c mod (n // SELECT_GROUP));
    each group's maximum takes one vectorised pass over the block. The k largest entries lie in
    the k groups with the largest maxima: those k groups hold k entries at least as large as any
    other group's maximum, hence as any entry outside them. So the k best groups are selected the
    same way among the maxima (recursively), and the answer is the top k of their k * SELECT_GROUP
    entries (plus the few tail columns that fill no group). Nothing is sorted but those few, and
    the block is read once. On other devices torch.topk is already a parallel selection.
    """
    rows, n = scores.shape
    if k == 1:
        v, j = scores.max(dim=1, keepdim=True)
        return v, j
    groups = n // SELECT_GROUP
    if scores.device.type != "cpu" or n < SELECT_MIN_COLUMNS or groups < SELECT_GROUPS_PER_ENTRY * k:
        return torch.topk(scores, k, dim=1)
    head = scores[:, : groups * SELECT_GROUP].view(rows, SELECT_GROUP, groups)
    _, best = select_top(head.amax(dim=1), k)
    offsets = torch.arange(SELECT_GROUP, device=scores.device) * groups
    cols = (best.unsqueeze(2) + offsets).view(rows, k * SELECT_GROUP)
    if groups * SELECT_GROUP < n:
        tail = torch.arange(groups * SELECT_GROUP, n, device=scores.device)
        cols = torch.cat([cols, tail.expand(rows, -1)], dim=1)
    v, pos = torch.topk(torch.gather(scores, 1, cols), k, dim=1)
    return v, torch.gather(cols, 1, pos)


def _merge_into(best_s, best_i, r0, v, j) -> None:
    """Merge candidate (scores v, ids j) into the running top-k of rows r0 .. r0 + len(v)."""
    r1 = r0 + len(v)
    k = best_s.shape[1]
    merged, pos = torch.topk(torch.cat([best_s[r0:r1], v], 1), k, dim=1)
    best_i[r0:r1] = torch.gather(torch.cat([best_i[r0:r1], j], 1), 1, pos)
    best_s[r0:r1] = merged


def _mask_columns(scores: torch.Tensor, cols: torch.Tensor) -> None:
    """Set scores[i, cols[i]] to -inf where cols[i] falls inside this block."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    inside = (cols >= 0) & (cols < scores.shape[1])
    scores[rows[inside], cols[inside]] = -torch.inf


class _LowPrecision:
    """A base converted to bf16/tf32 with what the rounding-error bound needs."""

    def __init__(self, base: torch.Tensor, dtype: str):
        self.dtype = dtype
        self.dim = base.shape[1]
        self.base, base_res = self.convert(base)
        base_norm = self.base.float().norm(dim=1)
        self.base_norm_max = float(base_norm.max()) if len(base) else 0.0
        self.base_res_max = float(base_res.max()) if len(base) else 0.0

    def convert(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-precision copy, norm of the rounding residual per row)."""
        if self.dtype == "bf16":
            low = x.to(torch.bfloat16)
            return low, (x - low.float()).norm(dim=1)
        return x, x.norm(dim=1) * _ROUNDOFF["tf32"]  # tf32 rounding happens inside the matmul

    def error_bound(
        self, q_norm: torch.Tensor, q_res: torch.Tensor, last: torch.Tensor, *, fp32_output: bool, biased: bool
    ) -> torch.Tensor:
        """How far above `last` (the lowest approximate score among a row's candidates, which no
        non-candidate's approximate score exceeds) any non-candidate's exact score can be.

        x.y - x~.y~ = r_x.y~ + x~.r_y + r_x.r_y (Cauchy-Schwarz on each term), plus fp32
        accumulation over d products. A bias added in fp32 afterwards (l2) rounds by at most
        2 u32 |last| at the candidates' edge. A product that comes back in bf16 was rounded to
        nearest: a stored value v hides at most u/(1-u) |v| <= 2u |v|, and v + 2u|v| grows with v,
        so for inner products the term is 2u |last| (small where the deciding scores are); with
        a bias the stored value is not the score, and |x~.y~| <= |x~| |y~| bounds it instead.
        """
        bn, br = self.base_norm_max, self.base_res_max
        bound = q_res * bn + q_norm * br + q_res * br
        scale = q_norm * bn
        bound = bound + 2 * self.dim * _FP32_ROUNDOFF * scale
        if biased:
            bound = bound + 2 * _FP32_ROUNDOFF * last.abs()
        if not fp32_output and self.dtype == "bf16":
            bound = bound + 2 * _ROUNDOFF["bf16"] * ((scale + bound) if biased else last.abs())
        return bound * 1.01 + 1e-7


@contextlib.contextmanager
def _allow_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def get_backend(
    backend: str | VectorBackend = "auto", device: str | torch.device = "cpu", dtype: str = "auto", **options
) -> VectorBackend:
    """A backend by name: 'faiss', 'torch', or 'auto'.

    'auto' takes Faiss on the CPU and on GPUs its build supports, and torch on any other
    accelerator, and on CUDA stacks the Faiss GPU wheels were not built for (CUDA 13, say).
    """
    if isinstance(backend, VectorBackend):
        return backend
    device = resolve_device(device)
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" or _faiss_has_gpu() else "torch"
    if backend == "faiss":
        return FaissBackend(device, **options)
    if backend == "torch":
        return TorchBackend(device, dtype, **options)
    raise ValueError(f"unknown vector backend {backend!r}; expected auto, faiss or torch")


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


__all__ = [
    "VectorBackend",
    "FaissBackend",
    "TorchBackend",
    "get_backend",
    "engine_dtype",
    "select_top",
    "METRICS",
    "DTYPES",
]
