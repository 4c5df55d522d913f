"""Fluence optimisation: non-negative bixel weights that minimise a weighted sum of dose objectives.

Method
------
The total objective is ``Σ_o weight_o f_o(d_o) + S(w) [+ P(d)]`` (objectives: see
:mod:`twinrt.planning.objectives`; ``d = A w`` with ``A`` the dij), minimised over ``w >= 0`` with
SciPy's L-BFGS-B (a bounded quasi-Newton method, the solver pyRadPlan uses by default). What makes
it fast:

* **Only rows that matter.** The dij rows of voxels inside structures with objectives are copied
  once into a CSR matrix (float32 values, uint16 column indices when there are < 65536 bixels:
  6 bytes per non-zero instead of 8, and the products are memory-bound).
* **One pass per evaluation.** A compiled (numba) loop computes, row by row, the voxel dose, the
  objective's gradient with respect to it, and its contribution ``a_rj * g_r`` to the weight
  gradient while the row is still in cache. Rows whose gradient is zero (e.g. an organ below its
  overdose threshold) are not read a second time. Objectives that need the whole structure's dose
  first (DVH quantiles, mean, gEUD) get a first pass over their rows only.
* **Exact active set for one-sided objectives.** A voxel whose only objectives are squared overdose
  (or the maximum-dose penalty) contributes nothing while it is below its threshold. Such voxels
  far below it (< :data:`ACTIVE_FRACTION` of the threshold at the start weights, typically most of
  the body) are left out of the CSR. After the solver stops, the full dose is computed; if any
  left-out voxel now exceeds ``ACTIVE_FRACTION`` of its threshold it is added and the solver goes on
  from the current weights. The final objective values are always evaluated on the full dose, and
  the problem solved equals the full one whenever no left-out voxel is above its threshold (which
  :attr:`OptimizationResult.message` reports). No voxel is sampled, so ``seed`` changes nothing.
* **A matRad-style start.** Uniform weights scaled so that the mean target dose equals the
  prescription (the largest dose of the target objectives that ask for dose), unless
  ``initial_weights`` are given (warm start).
* **Deterministic.** Every row's dose is summed in column order and the weight gradient is
  accumulated in a fixed number of row chunks that are added in order, so the same inputs give
  bit-identical weights whatever the number of threads.

Structures overlap as in matRad/pyRadPlan (``apply_overlap=True``): a voxel belongs only to the
structures of the highest priority class that contain it (targets 0, organs 5, other 10, external
15, pyRadPlan's defaults for its VOI types). So BODY objectives see no target voxels.

Smoothness (deliverability): ``S(w) = λ · Σ_(a,b) (k (w_a - w_b))² / n_pairs`` over pairs of
bixels of one beam that are neighbours on the x_bev/z_bev bixel lattice, where ``k`` is the mean
target dose per unit weight of a uniform fluence, which makes ``k Δw`` a dose (Gy) and ``λ``
comparable with the objective weights.

Maximum dose: a penalty, not a hard constraint (L-BFGS-B handles only bounds):
``P = ρ Σ max(d - D_max, 0)² / N`` over the ``N`` voxels of all structures with objectives, with
``ρ`` = :data:`MAX_DOSE_PENALTY` × the largest objective weight; when the solver stops with the
maximum more than 0.5 % above ``D_max``, ``ρ`` is multiplied by 10 and the solver continues (at
most 3 times, within ``max_iter``). The remaining excess is reported in the result.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numba
import numpy as np

from twinrt.errors import InvalidInputError, StructureError
from twinrt.model import Structure, StructureType
from twinrt.planning.dij import DoseInfluence
from twinrt.planning.objectives import CODE_WINDOW, DoseMimicking, KernelTerm, Objective
from twinrt.progress import CancelToken, ProgressCallback, report

logger = logging.getLogger(__name__)

#: Voxels whose only objectives are one-sided (overdose, max dose) join the optimisation once their
#: dose reaches this fraction of the lowest threshold among them.
ACTIVE_FRACTION = 0.7

#: Maximum-dose penalty weight as a multiple of the largest objective weight.
MAX_DOSE_PENALTY = 10.0

#: Fixed number of row chunks of the gradient accumulation (independent of the thread count, for
#: bit-identical results on any machine).
N_CHUNKS = 32

#: Below this many dij non-zeros the kernels run on one thread: the work is microseconds and a
#: parallel region's start-up (worse on a loaded machine) would dominate.
SERIAL_BELOW_NNZ = 2_000_000

#: Overlap priority by structure type (lower wins), pyRadPlan's defaults for its VOI types.
OVERLAP_PRIORITY = {StructureType.TARGET: 0, StructureType.ORGAN: 5, StructureType.OTHER: 10,
                    StructureType.EXTERNAL: 15}

#: Relative excess over ``max_dose_gy`` tolerated before the penalty is raised.
_MAX_DOSE_TOLERANCE = 0.005


# ---------------------------------------------------------------------- compiled kernels
# Compiled on first use and cached on disk by numba (cache=True), so later processes start at once.


@numba.njit(parallel=True, cache=True)
def _csc_matvec(indptr, indices, data, w, n_rows, n_parts):  # pragma: no cover - compiled
    """y = A w for a CSC A, parallel over row ranges: each range reads its slice of every column
    (found by binary search), so no two threads write the same y and every row sums in column order."""
    y = np.zeros(n_rows)
    n_cols = indptr.size - 1
    for p in numba.prange(n_parts):
        r0 = p * n_rows // n_parts
        r1 = (p + 1) * n_rows // n_parts
        for j in range(n_cols):
            wj = w[j]
            if wj == 0.0:
                continue
            s = indptr[j]
            e = indptr[j + 1]
            k = s + np.searchsorted(indices[s:e], r0)
            while k < e and indices[k] < r1:
                y[indices[k]] += data[k] * wj
                k += 1
    return y


@numba.njit(parallel=True, cache=True)
def _csc_rows_to_csr(indptr, indices, data, rowmap, n_local, col_proto, n_chunks):  # pragma: no cover
    """The rows r with rowmap[r] >= 0 of a CSC matrix, as CSR (row rowmap[r]); columns ascending.

    Column chunks count and fill in parallel; each chunk writes to slots reserved by a prefix sum
    over (row, chunk), so the output is the same for any thread count."""
    n_cols = indptr.size - 1
    counts = np.zeros((n_chunks, n_local), np.int64)
    for c in numba.prange(n_chunks):
        for j in range(c * n_cols // n_chunks, (c + 1) * n_cols // n_chunks):
            for k in range(indptr[j], indptr[j + 1]):
                r = rowmap[indices[k]]
                if r >= 0:
                    counts[c, r] += 1
    out_ptr = np.zeros(n_local + 1, np.int64)
    for r in range(n_local):
        acc = out_ptr[r]
        for c in range(n_chunks):
            n = counts[c, r]
            counts[c, r] = acc
            acc += n
        out_ptr[r + 1] = acc
    nnz = out_ptr[n_local]
    cols = np.empty(nnz, col_proto.dtype)
    vals = np.empty(nnz, np.float32)
    for c in numba.prange(n_chunks):
        for j in range(c * n_cols // n_chunks, (c + 1) * n_cols // n_chunks):
            for k in range(indptr[j], indptr[j + 1]):
                r = rowmap[indices[k]]
                if r >= 0:
                    pos = counts[c, r]
                    cols[pos] = j
                    vals[pos] = data[k]
                    counts[c, r] = pos + 1
    return out_ptr, cols, vals


@numba.njit(parallel=True, cache=True)
def _csr_matvec(indptr, cols, vals, w, n_rows):  # pragma: no cover - compiled
    """Dose of the first ``n_rows`` CSR rows (float64 sums in column order)."""
    y = np.zeros(n_rows)
    for r in numba.prange(n_rows):
        acc = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            acc += vals[k] * w[cols[k]]
        y[r] = acc
    return y


@numba.njit(parallel=True, cache=True)
def _fused_value_grad(indptr, cols, vals, w, y_pre, term_ptr, term_ids, t_code, t_coef, t_ref, t_lo, t_hi,
                      t_vscale, t_pow, p_ref, p_scale, n_chunks, n_bix):  # pragma: no cover - compiled
    """One pass over the CSR rows: dose d_r, voxel gradient g_r from the kernel terms (see
    objectives.KernelTerm), value, and the weight gradient Σ_r a_rj g_r accumulated per row chunk
    (chunks added in order afterwards, so the result does not depend on the thread count)."""
    n_rows = indptr.size - 1
    n_pre = y_pre.size
    acc = np.zeros((n_chunks, n_bix))
    fval = np.zeros(n_chunks)
    for c in numba.prange(n_chunks):
        f = 0.0
        # A chunk-local accumulator (n_bix float64, cache-resident), copied out once per chunk.
        loc = np.zeros(n_bix)
        for r in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
            s = indptr[r]
            e = indptr[r + 1]
            if r < n_pre:
                d = y_pre[r]
            else:
                d = 0.0
                for k in range(s, e):
                    d += vals[k] * w[cols[k]]
            g = 0.0
            for tt in range(term_ptr[r], term_ptr[r + 1]):
                t = term_ids[tt]
                code = t_code[t]
                if code == 0:
                    if d >= t_lo[t] and d <= t_hi[t]:
                        diff = d - t_ref[t]
                        g += t_coef[t] * diff
                        f += 0.5 * t_vscale[t] * t_coef[t] * diff * diff
                elif code == 1:
                    g += t_coef[t]
                elif code == 3:
                    diff = d - p_ref[tt]
                    if diff >= t_lo[t] and diff <= t_hi[t]:
                        g += t_coef[t] * p_scale[tt] * diff
                        f += 0.5 * t_vscale[t] * t_coef[t] * p_scale[tt] * diff * diff
                elif d > 0.0:
                    g += t_coef[t] * d ** t_pow[t]
            if g != 0.0:
                # The row was just read: this second sweep comes from cache.
                for k in range(s, e):
                    loc[cols[k]] += vals[k] * g
        acc[c] = loc
        fval[c] = f
    grad = np.zeros(n_bix)
    total = 0.0
    for c in range(n_chunks):
        grad += acc[c]
        total += fval[c]
    return grad, total


# ---------------------------------------------------------------------- result
@dataclass
class OptimizationResult:
    """Outcome of :func:`optimize_fluence`.

    :param weights: optimised bixel weights (float64, >= 0), in dij column order.
    :param dose_gy: dose on the dose grid (k, j, i), float32, Gy.
    :param objective_history: total objective after each solver iteration.
    :param iterations: solver iterations done (all restarts together).
    :param time_s: wall time of the whole call (s).
    :param objective_values: ``weight * f`` of every objective at the result, in the order given,
        evaluated on the full dose.
    :param total_objective: sum of ``objective_values`` plus smoothness (and max-dose penalty).
    :param smoothness_value: the smoothness term at the result.
    :param max_dose_excess_gy: how far the maximum dose exceeds ``max_dose_gy`` (0 when within or unset).
    :param n_voxels: voxels in structures with objectives; ``n_voxels_active``: those in the final
        optimisation (see the active set in the module docstring).
    :param message: the solver's final message and any warning (e.g. left-out voxels above threshold).
    :param evaluations: objective-and-gradient evaluations; ``nnz_active``: dij non-zeros they read.
    :param timings_s: cumulative wall time (s) at the end of each phase (masks, setup, csr, solve).
    """

    weights: np.ndarray
    dose_gy: np.ndarray
    objective_history: np.ndarray
    iterations: int
    time_s: float
    objective_values: list[float]
    total_objective: float
    smoothness_value: float = 0.0
    max_dose_excess_gy: float = 0.0
    n_voxels: int = 0
    n_voxels_active: int = 0
    message: str = ""
    evaluations: int = 0
    nnz_active: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- problem setup
def _find_structure(structures: Sequence[Structure], name: str) -> Structure:
    for s in structures:
        if s.name == name:
            return s
    for s in structures:
        if s.name.lower() == name.lower():
            return s
    raise StructureError(f"Objective on structure '{name}', which is not among the structures given "
                         f"({', '.join(s.name for s in structures) or 'none'}); add it or remove the objective",
                         name)


def _structure_voxels(dij: DoseInfluence, structures: Sequence[Structure], objectives: Sequence[Objective],
                      apply_overlap: bool) -> dict[str, np.ndarray]:
    """Flat dose-grid voxel indices (sorted int64) of every structure that has objectives."""
    used = []
    for o in objectives:
        s = _find_structure(structures, o.structure)
        if s not in used:
            used.append(s)
    masks: dict[int, np.ndarray] = {}

    def mask_of(s: Structure) -> np.ndarray:
        if id(s) not in masks:
            masks[id(s)] = np.asarray(s.on_grid(dij.dose_grid), dtype=bool).reshape(-1)
        return masks[id(s)]

    voxels = {}
    for s in used:
        m = mask_of(s)
        if apply_overlap:
            prio = OVERLAP_PRIORITY[s.type]
            # Voxels of structures with a strictly higher priority (lower number) are not this one's.
            for other in structures:
                if other is not s and OVERLAP_PRIORITY[other.type] < prio:
                    m = m & ~mask_of(other)
        idx = np.flatnonzero(m)
        if idx.size == 0:
            why = (" after removing its overlap with higher-priority structures (targets before organs before "
                   "the body)" if apply_overlap and mask_of(s).any() else "")
            raise StructureError(f"Structure '{s.name}' has no voxel on the dose grid{why}; check its contours "
                                 "or remove its objectives", s.name)
        voxels[s.name] = idx
    return voxels


def _neighbour_pairs(dij: DoseInfluence) -> np.ndarray:
    """(n_pairs, 2) column indices of bixels that are lattice neighbours within one beam."""
    pairs = []
    start = 0
    for b in dij.beams:
        ray = np.asarray(b.ray_bev_mm, dtype=float).reshape(-1, 3)
        n = ray.shape[0]
        if n > 1:
            width = float(b.beam.bixel_width_mm)
            ix = np.rint((ray[:, 0] - ray[:, 0].min()) / width).astype(np.int64)
            iz = np.rint((ray[:, 2] - ray[:, 2].min()) / width).astype(np.int64)
            key = ix * (iz.max() + 2) + iz
            order = np.argsort(key)
            sorted_keys = key[order]
            for dx, dz in ((1, 0), (0, 1)):
                want = (ix + dx) * (iz.max() + 2) + (iz + dz)
                pos = np.searchsorted(sorted_keys, want)
                ok = (pos < n) & (sorted_keys[np.minimum(pos, n - 1)] == want)
                a = np.flatnonzero(ok)
                pairs.append(np.stack([a + start, order[pos[ok]] + start], axis=1))
        start += n
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


class _Problem:
    """The optimisation data: rows, terms, CSR; evaluates objective and gradient."""

    def __init__(self, dij: DoseInfluence, objectives: Sequence[Objective], voxels: dict[str, np.ndarray],
                 max_dose_gy: Optional[float], cancel: Optional[CancelToken],
                 reference_doses: Optional[dict[str, np.ndarray]] = None):
        self.dij = dij
        self.cancel = cancel
        self.n_bix = dij.n_bixels
        csc = dij.matrix.tocsc() if dij.matrix.format != "csc" else dij.matrix
        self.csc_indptr = np.asarray(csc.indptr, dtype=np.int64)
        self.csc_indices = np.asarray(csc.indices)
        self.csc_data = np.asarray(csc.data, dtype=np.float32)
        self.n_vox = int(csc.shape[0])
        self.objectives = list(objectives)
        self.voxels = voxels
        self.max_dose_gy = max_dose_gy

        # Rows of structures whose objectives need the structure's whole dose come first ("global").
        global_names = sorted({_key(o, voxels) for o in self.objectives if o.needs_structure_dose})
        glob = np.unique(np.concatenate([voxels[n] for n in global_names])) if global_names else np.zeros(0, np.int64)
        allv = np.unique(np.concatenate(list(voxels.values())))
        rest = np.setdiff1d(allv, glob, assume_unique=True)
        self.n_global = int(glob.size)
        self.universe = np.concatenate([glob, rest])  # universe row -> dose-grid voxel
        self.row_of_voxel = np.full(self.n_vox, -1, dtype=np.int64)
        self.row_of_voxel[self.universe] = np.arange(self.universe.size)
        self.n_rows = int(self.universe.size)
        self.struct_rows = {n: self.row_of_voxel[v] for n, v in voxels.items()}

        # Terms: one per objective, plus the max-dose penalty; row -> terms as a CSR-like pair.
        self.n_terms = len(self.objectives) + (1 if max_dose_gy is not None else 0)
        self.t_code = np.zeros(self.n_terms, np.int64)
        self.t_coef = np.zeros(self.n_terms)
        self.t_ref = np.zeros(self.n_terms)
        self.t_lo = np.full(self.n_terms, -np.inf)
        self.t_hi = np.full(self.n_terms, np.inf)
        self.t_vscale = np.ones(self.n_terms)
        self.t_pow = np.zeros(self.n_terms)
        rows, terms, refs, scales = [], [], [], []
        for t, o in enumerate(self.objectives):
            key = _key(o, voxels)
            r = self.struct_rows[key]
            rows.append(r)
            terms.append(np.full(r.size, t, np.int64))
            if isinstance(o, DoseMimicking):
                o.bind(*_voxel_reference(o, voxels[key], reference_doses or {}))
                ref, scale = o.voxel_reference
                refs.append(ref)
                scales.append(scale)
            else:
                refs.append(np.zeros(r.size))
                scales.append(np.ones(r.size))
            if not o.needs_structure_dose:
                self._set_term(t, o.kernel_term(r.size))
        self.penalty_weight = 0.0
        if max_dose_gy is not None:
            t = self.n_terms - 1
            rows.append(np.arange(self.n_rows))
            terms.append(np.full(self.n_rows, t, np.int64))
            refs.append(np.zeros(self.n_rows))
            scales.append(np.ones(self.n_rows))
            self.penalty_weight = MAX_DOSE_PENALTY * max([o.weight for o in self.objectives] + [1.0])
            self._set_penalty(self.penalty_weight)
        rows_a = np.concatenate(rows)
        terms_a = np.concatenate(terms)
        order = np.lexsort((terms_a, rows_a))
        self.term_ids = terms_a[order]
        # Per (row, term) reference dose and scale: used only by voxel-wise terms (CODE_VOXEL).
        self.pair_ref = np.concatenate(refs)[order]
        self.pair_scale = np.concatenate(scales)[order]
        self.term_ptr = np.zeros(self.n_rows + 1, np.int64)
        np.cumsum(np.bincount(rows_a, minlength=self.n_rows), out=self.term_ptr[1:])

        # One-sided rows (every term a window open to the top, from a positive threshold) may be left out.
        upper = np.array([o.upper_only for o in self.objectives] + ([True] if max_dose_gy is not None else []))
        thr = np.array([o.dose_gy for o in self.objectives] + ([max_dose_gy] if max_dose_gy is not None else []))
        term_upper = upper[self.term_ids]
        all_upper = np.minimum.reduceat(term_upper.astype(np.int8), self.term_ptr[:-1]).astype(bool)
        row_thr = np.minimum.reduceat(np.where(term_upper, thr[self.term_ids], 0.0), self.term_ptr[:-1])
        self.row_threshold = np.where(all_upper & (row_thr > 0), row_thr, 0.0)
        self.row_threshold[:self.n_global] = 0.0  # global rows are always needed
        self.active = np.ones(self.n_rows, dtype=bool)
        self.csr = None
        self.row_ids = None  # universe rows in the CSR, in CSR order
        self.evaluations = 0

    # .................................................................. terms
    def _set_term(self, t: int, term: KernelTerm) -> None:
        self.t_code[t] = term.code
        self.t_coef[t] = term.coef
        self.t_ref[t] = term.ref
        self.t_lo[t] = term.lo
        self.t_hi[t] = term.hi
        self.t_vscale[t] = term.value_scale
        self.t_pow[t] = term.power

    def _set_penalty(self, rho: float) -> None:
        self.penalty_weight = rho
        d = float(self.max_dose_gy)
        self._set_term(self.n_terms - 1, KernelTerm(CODE_WINDOW, 2.0 * rho / self.n_rows, ref=d, lo=d))

    # .................................................................. dose
    def full_dose(self, w: np.ndarray) -> np.ndarray:
        """Dose (Gy, float64) of every dose-grid voxel: a row-partitioned pass over the whole CSC."""
        return _csc_matvec(self.csc_indptr, self.csc_indices, self.csc_data, np.ascontiguousarray(w, np.float64),
                                 self.n_vox, 64)

    def set_active(self, active: np.ndarray) -> None:
        """Build the CSR of the active universe rows (global rows first, then the rest, ascending)."""
        self.active = active
        self.row_ids = np.flatnonzero(active)
        rowmap = np.full(self.n_vox, -1, dtype=np.int64)
        rowmap[self.universe[self.row_ids]] = np.arange(self.row_ids.size)
        col_dtype = np.uint16 if self.n_bix < 65536 else np.int32
        self.csr = _csc_rows_to_csr(self.csc_indptr, self.csc_indices, self.csc_data, rowmap,
                                          int(self.row_ids.size), np.zeros(0, col_dtype), 8)
        self.a_term_ptr = np.zeros(self.row_ids.size + 1, np.int64)
        counts = np.diff(self.term_ptr)[self.row_ids]
        np.cumsum(counts, out=self.a_term_ptr[1:])
        sel = np.repeat(self.term_ptr[:-1][self.row_ids], counts) + (
            np.arange(int(counts.sum())) - np.repeat(self.a_term_ptr[:-1], counts))
        self.a_term_ids = self.term_ids[sel]
        self.a_pair_ref = self.pair_ref[sel]
        self.a_pair_scale = self.pair_scale[sel]

    # .................................................................. objective
    def evaluate(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective (without smoothness) and its gradient with respect to the weights."""
        if self.cancel is not None:
            self.cancel.check()
        self.evaluations += 1
        indptr, cols, vals = self.csr
        w = np.ascontiguousarray(w, dtype=np.float64)
        value = 0.0
        if self.n_global:
            # Structure-wide objectives: their rows' dose first, then this evaluation's kernel terms.
            y_pre = _csr_matvec(indptr, cols, vals, w, self.n_global)
            for t, o in enumerate(self.objectives):
                if o.needs_structure_dose:
                    d = y_pre[self.struct_rows[_key(o, self.voxels)]]
                    self._set_term(t, o.kernel_term(d.size, d))
                    value += o.value(d)
        else:
            y_pre = np.zeros(0)
        grad, fval = _fused_value_grad(indptr, cols, vals, w, y_pre, self.a_term_ptr, self.a_term_ids,
                                             self.t_code, self.t_coef, self.t_ref, self.t_lo, self.t_hi,
                                             self.t_vscale, self.t_pow, self.a_pair_ref, self.a_pair_scale,
                                             N_CHUNKS, self.n_bix)
        return value + fval, grad

    def objective_values(self, dose_flat: np.ndarray) -> list[float]:
        """``weight * f`` of every objective on the full dose (flat, dose-grid order)."""
        return [o.value(dose_flat[self.voxels[_key(o, self.voxels)]]) for o in self.objectives]

    def penalty_value(self, dose_flat: np.ndarray) -> float:
        if self.max_dose_gy is None:
            return 0.0
        ex = np.maximum(dose_flat[self.universe] - self.max_dose_gy, 0.0)
        return self.penalty_weight * float(ex @ ex) / self.n_rows


def _voxel_reference(o: "DoseMimicking", vox: np.ndarray,
                     reference_doses: dict[str, np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The reference (and standard-deviation) doses of a dose-mimicking objective at its voxels."""
    def flat(name: str, what: str) -> np.ndarray:
        if name not in reference_doses:
            known = ", ".join(sorted(reference_doses)) or "none"
            raise InvalidInputError(f"The dose_mimicking objective on '{o.structure}' needs the {what} dose "
                                    f"'{name}', which was not given (reference doses given: {known})")
        return np.asarray(reference_doses[name], dtype=np.float64).reshape(-1)

    ref = flat(o.reference, "reference")
    std = flat(o.uncertainty, "uncertainty") if o.uncertainty else None
    return ref[vox], (std[vox] if std is not None else None)


def _key(o: Objective, voxels: dict[str, np.ndarray]) -> str:
    """The structure name under which ``o``'s voxels are stored (names match case-insensitively)."""
    if o.structure in voxels:
        return o.structure
    for n in voxels:
        if n.lower() == o.structure.lower():
            return n
    raise StructureError(f"No voxels for structure '{o.structure}'", o.structure)


# ---------------------------------------------------------------------- public API
def optimize_fluence(dij: DoseInfluence, structures: list[Structure], objectives: list[Objective],
                     max_iter: int = 200, initial_weights: Optional[np.ndarray] = None,
                     smoothness_weight: float = 0.0, max_dose_gy: Optional[float] = None,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     seed: int = 0, apply_overlap: bool = True, tolerance: float = 1e-9,
                     reference_doses: Optional[dict[str, np.ndarray]] = None) -> OptimizationResult:
    """Optimise non-negative bixel weights for the given objectives (method: module docstring).

    :param dij: dose-influence matrix (Gy per unit weight) on its dose grid.
    :param structures: structures with masks on any grid (usually the CT's); each mask is mapped to
        the dose grid with :meth:`Structure.on_grid`. Structures without objectives matter only for
        overlap (``apply_overlap``).
    :param objectives: objectives; at least one must be on a target structure.
    :param max_iter: L-BFGS-B iterations in total (restarts included).
    :param initial_weights: start weights (warm start), >= 0, one per bixel; default: uniform weights
        giving the prescription as mean target dose.
    :param smoothness_weight: λ of the smoothness term (see module docstring); 0 disables it.
    :param max_dose_gy: maximum dose (Gy) in all structures with objectives, as an escalating penalty.
    :param progress: ``progress(fraction, text)`` after each iteration.
    :param cancel: token; cancelling raises :class:`twinrt.progress.CancelledError` within one evaluation.
    :param seed: reserved for sampled variants; the method uses no randomness, so the result depends only
        on the inputs.
    :param apply_overlap: give each voxel only to the highest-priority structures containing it (matRad).
    :param tolerance: L-BFGS-B ``ftol``: stop when the objective's relative decrease per iteration is below it.
    :param reference_doses: named doses (Gy) on the dij's dose grid ((k, j, i) or flat) that
        ``dose_mimicking`` objectives refer to (e.g. ``{"predicted": ..., "predicted_std": ...}``).
    :return: :class:`OptimizationResult`.
    :raises StructureError: an objective's structure is missing, or empty on the dose grid.
    :raises InvalidInputError: no objective on a target, bad weights or parameters.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not objectives:
        raise InvalidInputError("No objectives given; add at least one objective on a target structure")
    if int(max_iter) < 1:
        raise InvalidInputError(f"max_iter must be >= 1, got {max_iter!r}")
    max_iter = int(max_iter)
    if not (math.isfinite(smoothness_weight) and smoothness_weight >= 0):
        raise InvalidInputError(f"smoothness_weight must be a finite number >= 0, got {smoothness_weight!r}")
    if max_dose_gy is not None and not (math.isfinite(max_dose_gy) and max_dose_gy > 0):
        raise InvalidInputError(f"max_dose_gy must be a positive dose (Gy) or None, got {max_dose_gy!r}")
    for o in objectives:
        if not isinstance(o, Objective):
            raise InvalidInputError(f"Objectives must be Objective instances (see objective_from_dict), got {o!r}")
    targets = [o for o in objectives if _find_structure(structures, o.structure).type == StructureType.TARGET]
    if not targets:
        raise InvalidInputError("No objective on a target structure: add a target objective (e.g. squared deviation "
                                "to the prescription on the PTV), so that the plan has a dose to deliver")
    raising = [o.dose_gy for o in targets if o.raises_dose and o.dose_gy > 0]
    prescription = max(raising) if raising else max(o.dose_gy for o in targets)
    if prescription <= 0:
        raise InvalidInputError("The target objectives ask for 0 Gy; give the target objective its prescription dose")
    n_bix = dij.n_bixels
    w0 = None
    if initial_weights is not None:
        w0 = np.array(initial_weights, dtype=np.float64).reshape(-1)
        if w0.shape[0] != n_bix or not np.all(np.isfinite(w0)) or np.any(w0 < 0):
            raise InvalidInputError(f"initial_weights must be {n_bix} finite numbers >= 0 (one per bixel)")

    refs: dict[str, np.ndarray] = {}
    for name, arr in (reference_doses or {}).items():
        a = np.asarray(arr, dtype=np.float64).reshape(-1)
        if a.size != dij.matrix.shape[0]:
            raise InvalidInputError(f"The reference dose '{name}' has {a.size} voxels; it must be on the dose grid "
                                    f"of the dose-influence matrix ({dij.matrix.shape[0]} voxels): resample it first")
        refs[name] = a

    report(progress, 0.0, "Preparing the optimisation", cancel)
    threads = numba.get_num_threads()
    if dij.matrix.nnz < SERIAL_BELOW_NNZ:
        numba.set_num_threads(1)
    try:
        return _optimize(dij, structures, objectives, targets, prescription, max_iter, w0, smoothness_weight,
                         max_dose_gy, progress, cancel, apply_overlap, tolerance, t_start, timings, refs)
    finally:
        numba.set_num_threads(threads)


def _optimize(dij: DoseInfluence, structures: Sequence[Structure], objectives: Sequence[Objective],
              targets: list[Objective], prescription: float, max_iter: int, w0: Optional[np.ndarray],
              smoothness_weight: float, max_dose_gy: Optional[float], progress: Optional[ProgressCallback],
              cancel: Optional[CancelToken], apply_overlap: bool, tolerance: float, t_start: float,
              timings: dict[str, float], reference_doses: Optional[dict[str, np.ndarray]] = None) -> OptimizationResult:
    """The body of :func:`optimize_fluence` after input checks (arguments as there)."""
    from scipy.optimize import minimize

    n_bix = dij.n_bixels
    voxels = _structure_voxels(dij, structures, objectives, apply_overlap)
    timings["masks_s"] = time.perf_counter() - t_start
    prob = _Problem(dij, objectives, voxels, max_dose_gy, cancel, reference_doses)
    timings["setup_s"] = time.perf_counter() - t_start

    # Start weights and the dose-per-weight scale k of a uniform fluence over the targets.
    target_vox = np.unique(np.concatenate([voxels[_key(o, voxels)] for o in targets]))
    unit_dose = prob.full_dose(np.ones(n_bix))
    k_scale = float(unit_dose[target_vox].mean())
    if k_scale <= 0:
        raise InvalidInputError("The dij gives no dose to the target; check the beams' isocentre and the dose grid")
    if w0 is None:
        w0 = np.full(n_bix, prescription / k_scale)
        dose0 = unit_dose * (prescription / k_scale)
    else:
        dose0 = prob.full_dose(w0)
    report(progress, 0.0, "Selecting voxels", cancel)

    # Smoothness: S = c ||D w||^2 with D the neighbour-difference operator.
    smooth_c = 0.0
    dmat = None
    if smoothness_weight > 0:
        from scipy import sparse

        pairs = _neighbour_pairs(dij)
        if pairs.shape[0]:
            n_p = pairs.shape[0]
            dmat = sparse.csr_matrix((np.r_[np.ones(n_p), -np.ones(n_p)], (np.r_[np.arange(n_p), np.arange(n_p)],
                                      np.r_[pairs[:, 0], pairs[:, 1]])), shape=(n_p, n_bix))
            smooth_c = smoothness_weight * k_scale ** 2 / n_p

    def smooth(w: np.ndarray) -> tuple[float, np.ndarray]:
        if dmat is None:
            return 0.0, np.zeros_like(w)
        dw = dmat @ w
        return smooth_c * float(dw @ dw), 2.0 * smooth_c * (dmat.T @ dw)

    def inactive_over(dose_rows: np.ndarray, fraction: float) -> np.ndarray:
        return (~prob.active) & (prob.row_threshold > 0) & (dose_rows >= fraction * prob.row_threshold)

    active = (prob.row_threshold == 0) | (dose0[prob.universe] >= ACTIVE_FRACTION * prob.row_threshold)
    prob.set_active(active)
    timings["csr_s"] = time.perf_counter() - t_start

    history: list[float] = []
    w = w0.copy()
    iterations = 0
    messages = []
    escalations = 0
    stage = 0
    while True:
        remaining = max_iter - iterations
        # The first stage stops halfway to look at the left-out voxels, so that a grown active set
        # still gets half the budget.
        budget = remaining if stage > 0 or not np.any(prob.row_threshold > 0) else max(1, remaining // 2)
        stage += 1

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            f, g = prob.evaluate(x)
            fs, gs = smooth(x)
            return f + fs, g + gs

        def callback(intermediate_result) -> None:
            nonlocal iterations
            iterations += 1
            history.append(float(intermediate_result.fun))
            report(progress, iterations / max_iter, f"Iteration {iterations}/{max_iter}: objective "
                   f"{intermediate_result.fun:.6g}", cancel)

        res = minimize(fun, w, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n_bix, callback=callback,
                       options={"maxiter": budget, "maxfun": 3 * budget + 20, "ftol": tolerance, "gtol": 1e-12,
                                "maxcor": 20})
        w = np.maximum(np.asarray(res.x, dtype=np.float64), 0.0)
        messages.append(str(res.message))
        full = prob.full_dose(w)
        rows_dose = full[prob.universe]
        grow = inactive_over(rows_dose, ACTIVE_FRACTION)
        over = inactive_over(rows_dose, 1.0)
        excess = (float(rows_dose.max()) - max_dose_gy) if max_dose_gy is not None else 0.0
        escalate = (max_dose_gy is not None and excess > _MAX_DOSE_TOLERANCE * max_dose_gy and escalations < 3)
        # res.status 1 means the stage's iteration (or evaluation) budget ran out, not convergence.
        if iterations >= max_iter or (res.status != 1 and not (grow.any() or escalate)) or (
                res.nit == 0 and not grow.any()):
            break
        if grow.any():
            logger.info("Active set grows by %d voxels", int(grow.sum()))
            prob.set_active(prob.active | grow)
        elif escalate:
            escalations += 1
            prob._set_penalty(prob.penalty_weight * 10.0)

    timings["solve_s"] = time.perf_counter() - t_start
    values = prob.objective_values(full)
    s_val = smooth(w)[0]
    total = float(sum(values)) + s_val + prob.penalty_value(full)
    message = "; ".join(dict.fromkeys(messages))
    if over.any():
        message += (f"; {int(over.sum())} voxels left out of the optimisation ended above their threshold "
                    "(the objective values include them; more iterations would take them in)")
    excess = max(excess, 0.0)
    if max_dose_gy is not None and excess > _MAX_DOSE_TOLERANCE * max_dose_gy:
        message += f"; maximum dose exceeds max_dose_gy by {excess:.3g} Gy"
    report(progress, 1.0, f"Optimisation done: {iterations} iterations, objective {total:.6g}", None)
    dose = full.astype(np.float32).reshape(dij.dose_grid.shape)
    return OptimizationResult(weights=w, dose_gy=dose, objective_history=np.asarray(history), iterations=iterations,
                              time_s=time.perf_counter() - t_start, objective_values=values, total_objective=total,
                              smoothness_value=s_val, max_dose_excess_gy=excess, n_voxels=prob.n_rows,
                              n_voxels_active=int(prob.active.sum()), message=message, evaluations=prob.evaluations,
                              nnz_active=int(prob.csr[1].size), timings_s=timings)
