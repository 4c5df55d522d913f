"""6 MV photon pencil-beam dose engine: the sparse dose-influence matrix (dij) of a set of beams.

The model is matRad's and pyRadPlan's singular-value-decomposed pencil beam ("SVDPB",
pyRadPlan 0.5.0 ``PhotonPencilBeamSVDEngine``, BSD-3-Clause), after Bortfeld, Schlegel and Rhein,
Med. Phys. 20(2), 1993. For bixel ``b`` (a square of side ``bixel_width`` in the isocentre plane,
centred on its ray) and voxel ``v``:

    D(v, b) = (SAD / |v − s|)² · Σ_c β_c/(β_c − m) · (e^(−m·d) − e^(−β_c·d)) · K_c(x, z)

* ``s`` is the source; ``d`` the radiological depth of ``v`` (mm of water), from Siddon ray tracing
  of the relative electron density (:mod:`twinrt.planning.density`, pyRadPlan's HU table; 0
  outside the body) resampled to the dose grid, as pyRadPlan's ``trace_on_dose_grid``
  (:func:`twinrt.planning.raytrace.beam_depth_cube`);
* ``(x, z)`` is the voxel's lateral offset from the bixel's central ray, in the frame whose y axis
  is that ray (pyRadPlan's Rodrigues rotation), projected to the isocentre plane;
* ``K_c`` is the square fluence ⊗ Gaussian penumbra ⊗ SVD kernel ``c`` at the SSD of the beam's
  central ray (nearest tabulated SSD; :func:`twinrt.planning.machine.lateral_kernel_table`).

**Lateral cut-off.** A voxel receives dose from a bixel only when ``x² + z² ≤ cutoff²`` (iso-plane
mm; default 50 mm, pyRadPlan's ``geometric_lateral_cutoff``). Each bixel's column is computed
only over those voxels: rows of the dose grid are intersected analytically with the bixel's cone.

**Sparsity threshold.** With ``rel_threshold > 0`` a bixel's values below ``rel_threshold`` × its
own maximum are dropped (default :data:`DEFAULT_REL_THRESHOLD` = 5e-4); with 0 every computed
positive value is kept, as pyRadPlan does. Measured on TG-119 (9 beams, 5 mm bixels, 3 mm dose
grid): 177 M non-zeros (1.32 GiB) without it, 120 M (0.89 GiB) with 5e-4; the dropped kernel tail
lowers the plan dose by 0.6% of the maximum on average where it exceeds 10% (2% of the local
dose there), and gamma 3%/3 mm against pyRadPlan stays at 99.8%. 1e-3 halves the matrix again
but costs 2% of the maximum (gamma 96.5%), which is why it is not the default.

**Storage.** The CSC matrix is built directly, column by column, with int32 row indices and
float32 values (int64 only beyond 2³¹ non-zeros); rows are sorted within every column.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numba
import numpy as np

from twinrt.errors import GeometryError, InvalidInputError, StructureError
from twinrt.geometry import Grid, resample_array
from twinrt.model import Image
from twinrt.planning.beams import BeamRays
from twinrt.planning.density import density_on_grid
from twinrt.planning.dij import DoseInfluence
from twinrt.planning.machine import PhotonMachine, lateral_kernel_table, load_machine
from twinrt.planning.raytrace import beam_depth_cube, ssd_along_rays
from twinrt.progress import CancelToken, ProgressCallback, report

logger = logging.getLogger(__name__)

#: Default relative threshold: values below this fraction of the bixel's maximum are dropped
#: (see the module docstring for its measured cost and gain).
DEFAULT_REL_THRESHOLD = 5e-4
#: Electron density above which a voxel counts as patient when finding the SSD (pyRadPlan).
SSD_DENSITY_THRESHOLD = 0.05
#: Upper bound on the candidates buffered per chunk of bixels (8 bytes each).
_CHUNK_ENTRIES = 8_000_000


# ---------------------------------------------------------------------------------------------
# dose grid and memory estimate
# ---------------------------------------------------------------------------------------------
def dose_grid_for(ct_grid: Grid, spacing_mm: float | tuple[float, float, float]) -> Grid:
    """A dose grid covering the CT at ``spacing_mm``, placed as pyRadPlan's ``Grid.resample`` does.

    The number of voxels per axis is ``ceil(n_ct · ct_spacing / spacing)``; the origin moves by
    half the extra width so the new grid straddles the CT (for TG-119 at 5 mm: 101 × 101 × 65
    voxels from (−252, −252, −161.25) mm, the reference's dose grid).

    :param ct_grid: the CT grid.
    :param spacing_mm: dose voxel size (mm), one number or (di, dj, dk).
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InvalidInputError(f"Dose grid spacing must be positive (mm), got {spacing_mm!r}")
    n_ijk = np.array(ct_grid.shape[::-1], dtype=float)
    ct_sp = np.asarray(ct_grid.spacing_mm)
    new_n = np.ceil(np.round(n_ijk * ct_sp / sp, 9)).astype(int)
    diff = new_n * sp - n_ijk * ct_sp
    origin = np.asarray(ct_grid.origin_mm) - ct_grid.direction @ (diff / 2.0)
    return Grid(tuple(int(v) for v in new_n[::-1]), tuple(sp), tuple(origin), ct_grid.direction)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated size of a dij computation.

    :param n_voxels: dose-grid voxels (rows).
    :param n_calc_voxels: voxels where dose is computed.
    :param n_bixels: bixels (columns).
    :param nnz: estimated non-zeros before any threshold (an upper bound).
    :param matrix_bytes: bytes of the CSC arrays for ``nnz`` entries.
    :param working_bytes: bytes of the per-beam work arrays and buffers.
    """

    n_voxels: int
    n_calc_voxels: int
    n_bixels: int
    nnz: int
    matrix_bytes: int
    working_bytes: int

    @property
    def total_bytes(self) -> int:
        """Matrix plus working memory (bytes)."""
        return self.matrix_bytes + self.working_bytes

    def __str__(self) -> str:
        return (f"{self.n_bixels} bixels × {self.n_calc_voxels} dose voxels: about {self.nnz / 1e6:.0f} M "
                f"non-zeros, {self.matrix_bytes / 2**30:.2f} GiB for the matrix + "
                f"{self.working_bytes / 2**30:.2f} GiB working memory")


def _available_bytes() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def estimate_dij_memory(dose_grid: Grid, beams: list[BeamRays], calc_mask: np.ndarray | None = None,
                        lateral_cutoff_mm: float = 50.0, max_bytes: int | None = None) -> MemoryEstimate:
    """Estimate the dij's size and refuse a problem that will not fit in memory.

    The non-zero count is bounded per bixel by the calc-mask voxels inside its cone: π·cutoff²
    (scaled to each depth) times the calc region's extent along the beam, over the voxel volume,
    and never more than the calc-mask voxels. It is an over-estimate (the calc region is taken as
    its bounding box) so a refusal is safe; the real count is printed after the computation.

    :param dose_grid: the dose grid.
    :param beams: the beams and their rays.
    :param calc_mask: bool (k, j, i) mask on ``dose_grid`` where dose is computed (default: all).
    :param lateral_cutoff_mm: lateral cut-off in the isocentre plane (mm).
    :param max_bytes: refuse above this many bytes (default: 80% of the memory available now).
    :return: the estimate.
    :raises InvalidInputError: with the estimate, when it exceeds ``max_bytes`` or int64 limits.
    """
    n_vox = int(np.prod(dose_grid.shape))
    n_bix = int(sum(b.n_rays for b in beams))
    if calc_mask is None:
        n_calc = n_vox
        lo, hi = dose_grid.extent_lps()
    else:
        dose_grid.check_array(calc_mask, "dose calculation mask")
        kji = np.argwhere(calc_mask)
        n_calc = int(kji.shape[0])
        if n_calc == 0:
            lo = hi = np.asarray(dose_grid.origin_mm)
        else:
            pts = dose_grid.index_to_lps(np.array([kji.min(0), kji.max(0)])[:, ::-1].astype(float))
            lo, hi = pts.min(0), pts.max(0)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox_vol = float(np.prod(dose_grid.spacing_mm))
    nnz = 0
    for b in beams:
        if b.n_rays == 0:
            continue
        t = (corners - b.beam.source_mm) @ b.beam.direction
        t0, t1 = max(float(t.min()), 1.0), max(float(t.max()), 1.0)
        # Cone volume between t0 and t1 for radius cutoff·t/SAD, plus one voxel of slack around it.
        r_scale = lateral_cutoff_mm / b.beam.sad_mm
        slack = vox_vol ** (1 / 3)
        vol = np.pi * r_scale**2 * (t1**3 - t0**3) / 3.0 + np.pi * r_scale * slack * (t1**2 - t0**2)
        nnz += b.n_rays * int(min(n_calc, vol / vox_vol))
    idx_bytes = 4 if nnz < 2**31 - 1 else 8
    matrix = nnz * (4 + idx_bytes) + (n_bix + 1) * idx_bytes
    # Dense per-beam arrays (density, depth, owner ray, slot map, mask) + one chunk buffer.
    working = n_vox * (4 + 4 + 4 + 4 + 1 + 8) + _CHUNK_ENTRIES * 8
    est = MemoryEstimate(n_vox, n_calc, n_bix, int(nnz), int(matrix), int(working))
    limit = int(0.8 * _available_bytes()) if max_bytes is None else int(max_bytes)
    if n_vox >= 2**31 - 1:
        raise InvalidInputError(f"The dose grid has {n_vox} voxels, more than 2^31: use a coarser dose grid")
    if est.total_bytes > limit:
        raise InvalidInputError(
            f"The dose-influence matrix would not fit in memory: {est}, limit {limit / 2**30:.2f} GiB. "
            "Use a coarser dose grid, a smaller lateral cut-off, fewer or larger bixels, or a "
            "calculation mask restricted to the body")
    return est


# ---------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _row_interval(rr0, rr1, rr2, cx, cy, cz, c2, i0, i1):  # pragma: no cover - numba
    """[lo, hi) of i in [i0, i1) where the row r(i) = rr + i·c may lie inside the cone."""
    qa = cx * cx + cz * cz - c2 * cy * cy
    qb = 2.0 * (rr0 * cx + rr2 * cz - c2 * rr1 * cy)
    qc = rr0 * rr0 + rr2 * rr2 - c2 * rr1 * rr1
    if qa > 1e-12:
        disc = qb * qb - 4.0 * qa * qc
        if disc < 0.0:
            return i0, i0
        sq = np.sqrt(disc)
        lo = (-qb - sq) / (2.0 * qa)
        hi = (-qb + sq) / (2.0 * qa)
        # One voxel of slack each side for rounding; every voxel is tested exactly below.
        ilo = max(i0, int(np.floor(lo)) - 1)
        ihi = min(i1, int(np.floor(hi)) + 2)
        if ihi < ilo:
            ihi = ilo
        return ilo, ihi
    # Row almost parallel to the ray: the quadratic is not bounded, test the whole row.
    return i0, i1


@numba.njit(cache=True, parallel=True)
def _count_candidates(r0, cmat, ranges, c2, out):  # pragma: no cover - numba
    for b in numba.prange(r0.shape[0]):
        total = 0
        k0, k1, j0, j1, i0, i1 = ranges[b, 0], ranges[b, 1], ranges[b, 2], ranges[b, 3], ranges[b, 4], ranges[b, 5]
        for k in range(k0, k1):
            for j in range(j0, j1):
                rr0 = r0[b, 0] + j * cmat[b, 0, 1] + k * cmat[b, 0, 2]
                rr1 = r0[b, 1] + j * cmat[b, 1, 1] + k * cmat[b, 1, 2]
                rr2 = r0[b, 2] + j * cmat[b, 2, 1] + k * cmat[b, 2, 2]
                lo, hi = _row_interval(rr0, rr1, rr2, cmat[b, 0, 0], cmat[b, 1, 0], cmat[b, 2, 0], c2, i0, i1)
                total += hi - lo
        out[b] = total


@numba.njit(cache=True, parallel=True, fastmath=True)
def _fill_bixels(slot_map, factors, r0, cmat, ranges, c2, sad, table, inv_step, rel_threshold,
                 offsets, rows, vals, counts):  # pragma: no cover - numba
    nj = slot_map.shape[1]
    ni = slot_map.shape[2]
    ncomp = factors.shape[1]
    for b in numba.prange(r0.shape[0]):
        start = offsets[b]
        pos = start
        vmax = 0.0
        k0, k1, j0, j1, i0, i1 = ranges[b, 0], ranges[b, 1], ranges[b, 2], ranges[b, 3], ranges[b, 4], ranges[b, 5]
        cx, cy, cz = cmat[b, 0, 0], cmat[b, 1, 0], cmat[b, 2, 0]
        for k in range(k0, k1):
            for j in range(j0, j1):
                rr0 = r0[b, 0] + j * cmat[b, 0, 1] + k * cmat[b, 0, 2]
                rr1 = r0[b, 1] + j * cmat[b, 1, 1] + k * cmat[b, 1, 2]
                rr2 = r0[b, 2] + j * cmat[b, 2, 1] + k * cmat[b, 2, 2]
                lo, hi = _row_interval(rr0, rr1, rr2, cx, cy, cz, c2, i0, i1)
                base = (k * nj + j) * ni
                for i in range(lo, hi):
                    slot = slot_map[k, j, i]
                    if slot < 0:
                        continue
                    y = rr1 + i * cy
                    if y <= 0.0:
                        continue
                    x = rr0 + i * cx
                    z = rr2 + i * cz
                    if x * x + z * z > c2 * y * y:
                        continue
                    # |offset| from the central ray projected to the isocentre plane, in table cells.
                    f = sad / y * inv_step
                    u = abs(x) * f
                    w = abs(z) * f
                    iu = int(u)
                    iw = int(w)
                    fu = u - iu
                    fw = w - iw
                    val = 0.0
                    for c in range(ncomp):
                        t = ((1.0 - fu) * ((1.0 - fw) * table[iu, iw, c] + fw * table[iu, iw + 1, c])
                             + fu * ((1.0 - fw) * table[iu + 1, iw, c] + fw * table[iu + 1, iw + 1, c]))
                        val += factors[slot, c] * t
                    if val > 0.0:
                        rows[pos] = base + i
                        vals[pos] = val
                        pos += 1
                        if val > vmax:
                            vmax = val
        if rel_threshold > 0.0 and pos > start:
            thr = rel_threshold * vmax
            keep = start
            for p in range(start, pos):
                if vals[p] >= thr:
                    rows[keep] = rows[p]
                    vals[keep] = vals[p]
                    keep += 1
            pos = keep
        counts[b] = pos - start


@numba.njit(cache=True)
def _append(rows_buf, vals_buf, offsets, counts, out_rows, out_vals, out_start):  # pragma: no cover - numba
    """Copy each bixel's values from the chunk buffer to the matrix.

    Serial on purpose: the destination pages are written for the first time, and concurrent first
    touches serialise on the kernel's page-table lock (measured 10x slower with two threads).
    """
    pos = out_start
    for b in range(counts.shape[0]):
        s = offsets[b]
        for p in range(counts[b]):
            out_rows[pos] = rows_buf[s + p]
            out_vals[pos] = vals_buf[s + p]
            pos += 1
    return pos


# ---------------------------------------------------------------------------------------------
# per-beam geometry
# ---------------------------------------------------------------------------------------------
def _bixel_frames(br: BeamRays) -> np.ndarray:
    """(n, 3, 3) matrices Q_b = U_bᵀ Rᵀ taking LPS offsets from the source to the bixel's ray frame.

    U_b is pyRadPlan's Rodrigues rotation taking the central axis (0, 1, 0) to the bixel's axis in
    BEV (``calc_geo_dists``), so in the ray frame the bixel's axis is +y and the lateral axes stay
    close to x_bev and z_bev.
    """
    sad = br.beam.sad_mm
    rays = np.asarray(br.ray_bev_mm, dtype=float)
    b = np.stack([rays[:, 0], np.full(len(rays), sad), rays[:, 2]], axis=1)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    a = np.array([0.0, 1.0, 0.0])
    v = np.cross(a, b)                                       # (n, 3)
    s2 = np.sum(v * v, axis=1)
    cosang = b @ a
    vx = np.zeros((len(rays), 3, 3))
    vx[:, 0, 1], vx[:, 0, 2] = -v[:, 2], v[:, 1]
    vx[:, 1, 0], vx[:, 1, 2] = v[:, 2], -v[:, 0]
    vx[:, 2, 0], vx[:, 2, 1] = -v[:, 1], v[:, 0]
    u = np.broadcast_to(np.eye(3), vx.shape).copy()
    nz = s2 > 1e-20
    u[nz] += vx[nz] + (vx[nz] @ vx[nz]) * ((1.0 - cosang[nz]) / s2[nz])[:, None, None]
    return np.transpose(u, (0, 2, 1)) @ br.beam.rotation.T


def _bixel_ranges(br: BeamRays, grid: Grid, bbox: np.ndarray, c: float) -> np.ndarray:
    """(n, 6) index ranges [k0, k1, j0, j1, i0, i1) of each bixel's cone inside ``bbox``.

    The truncated cone between the nearest and farthest axial distance of the calc region is the
    convex hull of its two end discs (radius c·t), so its bounding box is theirs.
    """
    src = br.beam.source_mm
    (k0, k1), (j0, j1), (i0, i1) = bbox
    corner_idx = np.array([[i, j, k] for i in (i0, i1 - 1) for j in (j0, j1 - 1) for k in (k0, k1 - 1)], float)
    corners = grid.index_to_lps(corner_idx)
    rays = np.asarray(br.ray_bev_mm, dtype=float)
    axis_bev = np.stack([rays[:, 0], np.full(len(rays), br.beam.sad_mm), rays[:, 2]], axis=1)
    axis = axis_bev @ br.beam.rotation.T
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)      # (n, 3) LPS unit axes
    t = (corners - src) @ axis.T                             # (8, n)
    t_lo = np.maximum(t.min(axis=0), 1e-3)
    t_hi = np.maximum(t.max(axis=0), 1e-3)
    dirs = grid.direction                                    # columns: LPS unit vectors of i, j, k
    sp = np.asarray(grid.spacing_mm)
    cos_a = axis @ dirs                                      # (n, 3) (i, j, k)
    sin_a = np.sqrt(np.clip(1.0 - cos_a**2, 0.0, 1.0))
    lo = np.full((len(rays), 3), np.inf)
    hi = np.full((len(rays), 3), -np.inf)
    for tt in (t_lo, t_hi):
        centre = grid.lps_to_index(src + axis * tt[:, None])  # (n, 3) continuous (i, j, k)
        ext = (c * tt)[:, None] * sin_a / sp
        lo = np.minimum(lo, centre - ext)
        hi = np.maximum(hi, centre + ext)
    lo = np.floor(lo).astype(np.int64) - 1
    hi = np.ceil(hi).astype(np.int64) + 2
    out = np.empty((len(rays), 6), np.int64)
    for col, (a_lo, a_hi), ax in ((0, (k0, k1), 2), (2, (j0, j1), 1), (4, (i0, i1), 0)):
        out[:, col] = np.clip(lo[:, ax], a_lo, a_hi)
        out[:, col + 1] = np.clip(hi[:, ax], a_lo, a_hi)
    out[:, 1] = np.maximum(out[:, 1], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 2])
    out[:, 5] = np.maximum(out[:, 5], out[:, 4])
    return out


@dataclass
class _BeamSetup:
    slot_map: np.ndarray        # (k, j, i) int32, -1 where no dose
    factors: np.ndarray         # (n_slots, n_comp) float32 depth-dose × inverse square
    kernel_ssd_mm: float
    ray_ssd_mm: np.ndarray


def _covered(br: BeamRays, grid: Grid, calc: np.ndarray, cutoff_mm: float) -> np.ndarray:
    """Calc voxels whose projection on the isocentre plane lies within the cut-off of some ray.

    Only these need a radiological depth. The test is done on a raster of the isocentre plane
    (distance transform of the ray positions) with a margin of 3 mm plus two raster steps, which
    covers the raster's rounding and the small difference between this central-axis projection
    and the per-bixel frame of the exact cut-off test made later.
    """
    from scipy import ndimage

    beam = br.beam
    flat = np.flatnonzero(calc.reshape(-1))
    kk, jj, ii = np.unravel_index(flat, grid.shape)
    m = grid.ijk_to_lps()
    a = beam.rotation.T @ m[:3, :3]
    off = beam.rotation.T @ (m[:3, 3] - beam.source_mm)
    q = [off[r] + a[r, 0] * ii + a[r, 1] * jj + a[r, 2] * kk for r in range(3)]
    ahead = q[1] > 1e-6
    qy = np.where(ahead, q[1], 1.0)
    ux = q[0] / qy * beam.sad_mm
    uz = q[2] / qy * beam.sad_mm
    rays = np.asarray(br.ray_bev_mm, dtype=float)[:, [0, 2]]
    step = min(1.0, beam.bixel_width_mm / 4.0)
    reach = cutoff_mm + 3.0 + 2.0 * step
    lo = rays.min(axis=0) - reach - 2 * step
    n = np.ceil((rays.max(axis=0) + reach + 2 * step - lo) / step).astype(int) + 1
    marks = np.ones(tuple(n), dtype=bool)
    ri = np.round((rays - lo) / step).astype(int)
    marks[ri[:, 0], ri[:, 1]] = False
    near = ndimage.distance_transform_edt(marks) * step <= reach
    pi = np.round((ux - lo[0]) / step).astype(np.int64)
    pk = np.round((uz - lo[1]) / step).astype(np.int64)
    inside = ahead & (pi >= 0) & (pi < n[0]) & (pk >= 0) & (pk < n[1])
    hit = np.zeros(flat.size, dtype=bool)
    hit[inside] = near[pi[inside], pk[inside]]
    out = np.zeros(calc.size, dtype=bool)
    out[flat[hit]] = True
    return out.reshape(calc.shape)


def _setup_beam(br: BeamRays, density: np.ndarray, grid: Grid, calc: np.ndarray, machine: PhotonMachine,
                ssd_threshold: float, cutoff_mm: float) -> _BeamSetup:
    beam = br.beam
    src = beam.source_mm
    depth = beam_depth_cube(density, grid, src, beam.rotation, calc & _covered(br, grid, calc, cutoff_mm))
    # SSD per ray along source → 2·ray − source (pyRadPlan's target points), then the kernel of
    # the ray nearest the central axis, falling back to the nearest ray that hits the patient.
    targets = 2.0 * br.ray_iso_plane_mm - src
    ray_ssd = ssd_along_rays(density, grid, src, targets, ssd_threshold)
    hit = np.isfinite(ray_ssd)
    if not np.any(hit):
        raise GeometryError(
            f"The beam at gantry {beam.gantry_deg:g}°, couch {beam.couch_deg:g}° misses the patient: none of "
            "its rays crosses the body. Check the isocentre, the angles and the body contour")
    r2 = np.sum(np.asarray(br.ray_bev_mm)[:, [0, 2]] ** 2, axis=1)
    centre = int(np.argmin(np.where(hit, r2, np.inf))) if not hit[int(np.argmin(r2))] else int(np.argmin(r2))
    kernel_ssd = float(ray_ssd[centre])

    flat = np.flatnonzero(np.isfinite(depth.reshape(-1)))
    slot_map = np.full(grid.shape, -1, dtype=np.int32)
    slot_map.reshape(-1)[flat] = np.arange(flat.size, dtype=np.int32)
    d = depth.reshape(-1)[flat].astype(np.float64)
    kk, jj, ii = np.unravel_index(flat, grid.shape)
    # Elementwise affine map (no BLAS call for a tall (n, 3) product).
    m = grid.ijk_to_lps()
    geo2 = np.zeros(flat.size)
    for ax in range(3):
        coord = (m[ax, 3] - src[ax]) + m[ax, 0] * ii + m[ax, 1] * jj + m[ax, 2] * kk
        geo2 += coord * coord
    inv_sq = beam.sad_mm**2 / geo2
    factors = (machine.depth_dose(d) * inv_sq).T.astype(np.float32)
    return _BeamSetup(slot_map, np.ascontiguousarray(factors), kernel_ssd, ray_ssd)


def _validate(ct: Image, dose_grid: Grid, beams: list[BeamRays], calc_mask: np.ndarray | None,
              lateral_cutoff_mm: float, machine: PhotonMachine) -> None:
    if not isinstance(ct, Image):
        raise InvalidInputError("ct must be a twinrt.model.Image holding the CT in HU")
    if not isinstance(dose_grid, Grid):
        raise InvalidInputError("dose_grid must be a twinrt.geometry.Grid")
    if not beams:
        raise InvalidInputError("No beams given: add at least one beam with rays")
    for n, b in enumerate(beams):
        if not isinstance(b, BeamRays):
            raise InvalidInputError(f"Beam {n} is not a BeamRays (beam plus ray positions)")
        if b.n_rays == 0:
            raise InvalidInputError(f"Beam {n} (gantry {b.beam.gantry_deg:g}°) has no rays: generate its "
                                    "bixels from the target first")
        rays = np.asarray(b.ray_bev_mm, dtype=float)
        if rays.ndim != 2 or rays.shape[1] != 3 or not np.all(np.isfinite(rays)):
            raise InvalidInputError(f"Beam {n}: ray positions must be an (n, 3) array of finite mm values")
        if abs(b.beam.sad_mm - machine.sad_mm) > 1e-6:
            raise InvalidInputError(f"Beam {n} has SAD {b.beam.sad_mm:g} mm but the machine's is "
                                    f"{machine.sad_mm:g} mm")
    if not (np.isfinite(lateral_cutoff_mm) and lateral_cutoff_mm > 0):
        raise InvalidInputError(f"The lateral cut-off must be a positive distance (mm), got {lateral_cutoff_mm!r}")
    if calc_mask is not None:
        dose_grid.check_array(calc_mask, "dose calculation mask")
        if not np.any(calc_mask):
            raise StructureError("The dose calculation mask is empty: give the body (external) structure "
                                 "on the dose grid", None)


def check_beams_hit_target(beams: list[BeamRays], target_mask: np.ndarray, grid: Grid) -> None:
    """Raise :class:`GeometryError` for a beam none of whose bixels covers any target voxel.

    A target voxel is covered when its projection onto the isocentre plane lies inside a bixel
    (a ``bixel_width`` square around a ray position).

    :param target_mask: bool (k, j, i) target mask on ``grid``.
    """
    grid.check_array(target_mask, "target mask")
    kji = np.argwhere(target_mask)
    if kji.size == 0:
        raise StructureError("The target structure is empty: contour the target first", None)
    pts = grid.index_to_lps(kji[:, ::-1].astype(float))
    for n, br in enumerate(beams):
        beam = br.beam
        bev = beam.lps_to_bev(pts)
        ahead = beam.sad_mm + bev[:, 1] > 0
        proj = bev[ahead][:, [0, 2]] * (beam.sad_mm / (beam.sad_mm + bev[ahead][:, 1]))[:, None]
        rays = np.asarray(br.ray_bev_mm, dtype=float)[:, [0, 2]]
        half = beam.bixel_width_mm / 2.0
        covered = False
        if proj.size and rays.size:
            from scipy.spatial import cKDTree

            # Chebyshev distance ≤ half a bixel means inside the bixel's square.
            dist, _ = cKDTree(rays).query(proj, k=1, p=np.inf)
            covered = bool(np.any(dist <= half + 1e-9))
        if not covered:
            raise GeometryError(
                f"Beam {n} (gantry {beam.gantry_deg:g}°, couch {beam.couch_deg:g}°) misses the target: none of "
                "its bixels covers a target voxel. Regenerate its rays from the target or fix the isocentre")


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def compute_dij(ct: Image, dose_grid: Grid, beams: list[BeamRays], calc_mask: np.ndarray | None = None,
                lateral_cutoff_mm: float = 50.0, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None, *, body_mask: np.ndarray | None = None,
                target_mask: np.ndarray | None = None, machine: PhotonMachine | None = None,
                rel_threshold: float = DEFAULT_REL_THRESHOLD,
                hlut: tuple[np.ndarray, np.ndarray] | None = None,
                ssd_density_threshold: float = SSD_DENSITY_THRESHOLD,
                max_bytes: int | None = None, stats: dict | None = None) -> DoseInfluence:
    """The dose-influence matrix (Gy per unit bixel weight) of photon beams on a dose grid.

    :param ct: the CT (HU) on its grid.
    :param dose_grid: the grid of the dij rows (e.g. :func:`dose_grid_for`).
    :param beams: beams with their rays (columns in this order).
    :param calc_mask: bool (k, j, i) mask on ``dose_grid``: dose is computed only there and is
        exactly 0 elsewhere. Default: ``body_mask`` resampled (nearest) to the dose grid, or
        every voxel whose traced density exceeds ``ssd_density_threshold`` when there is no body.
    :param lateral_cutoff_mm: a voxel gets dose from a bixel only within this distance (mm) of the
        bixel's central ray, measured in the isocentre plane (pyRadPlan's default 50 mm).
    :param progress: ``progress(fraction, text)`` callback.
    :param cancel: token checked between chunks of bixels.
    :param body_mask: bool (k, j, i) on the CT grid; density is 0 outside it (pyRadPlan's
        ``ignore_outside_densities``).
    :param target_mask: optional bool (k, j, i) target on the dose grid; a beam that covers none
        of it is refused.
    :param machine: the photon machine (default: the generic 6 MV machine).
    :param rel_threshold: per bixel, drop values below this fraction of the bixel's maximum
        (0 keeps every positive value).
    :param hlut: HU→density table (default pyRadPlan's, see :mod:`twinrt.planning.density`).
    :param ssd_density_threshold: density above which a voxel counts as patient for the SSD.
    :param max_bytes: refuse (before computing) if the memory estimate exceeds this; default 80%
        of the currently available memory.
    :param stats: optional dict, filled with ``nnz``, ``bytes``, ``seconds``, ``estimate``, ``timings``,
        ``kernel_ssd_mm`` (per beam) and ``ray_ssd_mm`` (per beam).
    :return: :class:`DoseInfluence` with a float32 CSC matrix (n_voxels, n_bixels).
    """
    t_start = time.perf_counter()
    machine = load_machine() if machine is None else machine
    _validate(ct, dose_grid, beams, calc_mask, lateral_cutoff_mm, machine)
    if not (0.0 <= rel_threshold < 1.0):
        raise InvalidInputError(f"rel_threshold must be in [0, 1), got {rel_threshold!r}")
    if body_mask is not None:
        ct.grid.check_array(body_mask, "body mask")
        if not np.any(body_mask):
            raise StructureError("The body (external) structure is empty: contour the body first", "BODY")
    report(progress, 0.0, "Preparing the density", cancel)
    density = density_on_grid(ct.array, ct.grid, dose_grid, body_mask, hlut)
    if calc_mask is None:
        if body_mask is not None:
            calc = resample_array(np.asarray(body_mask, dtype=np.uint8), ct.grid, dose_grid, order=0).astype(bool)
        else:
            calc = density > ssd_density_threshold
        if not calc.any():
            raise StructureError("No dose-grid voxel lies inside the body: the dose grid does not overlap the CT",
                                 "BODY")
    else:
        calc = np.asarray(calc_mask, dtype=bool)
    if target_mask is not None:
        dose_grid.check_array(target_mask, "target mask")
        if not np.any(np.asarray(target_mask, bool) & calc):
            raise StructureError("The target lies outside the body (no target voxel in the dose calculation "
                                 "region): check the target and body contours", None)
        check_beams_hit_target(beams, np.asarray(target_mask, bool), dose_grid)
    estimate = estimate_dij_memory(dose_grid, beams, calc, lateral_cutoff_mm, max_bytes)
    logger.info("dij estimate: %s", estimate)

    kji = np.argwhere(calc)
    bbox = np.stack([kji.min(0), kji.max(0) + 1], axis=1).astype(np.int64)   # (k, j, i) × [lo, hi)
    c2 = (lateral_cutoff_mm / machine.sad_mm) ** 2
    n_bix = estimate.n_bixels
    m = dose_grid.ijk_to_lps()

    # Geometry of every bixel first: its ray frame and an upper bound of its non-zeros (the voxels
    # of its cone's rows), which sizes the chunks of bixels computed in parallel.
    geometry = []
    for br in beams:
        frames = _bixel_frames(br)                                            # (n, 3, 3)
        r0 = np.ascontiguousarray(frames @ (m[:3, 3] - br.beam.source_mm))    # (n, 3)
        cmat = np.ascontiguousarray(frames @ m[:3, :3])                       # (n, 3, 3): columns i, j, k
        ranges = _bixel_ranges(br, dose_grid, bbox, np.sqrt(c2))
        upper = np.empty(br.n_rays, np.int64)
        _count_candidates(r0, cmat, ranges, c2, upper)
        geometry.append((r0, cmat, ranges, upper))
    total_upper = int(sum(int(g[3].sum()) for g in geometry))
    chunk = int(max(_CHUNK_ENTRIES, max(int(g[3].max()) for g in geometry)))
    try:
        buf_rows = np.empty(chunk, dtype=np.int32)
        buf_vals = np.empty(chunk, dtype=np.float32)
        # Reserved, not used: np.empty only maps virtual memory, pages become resident when written,
        # and the final in-place shrink returns the rest. Growing instead would copy the matrix.
        rows = np.empty(max(total_upper, 1), dtype=np.int32)
        vals = np.empty(max(total_upper, 1), dtype=np.float32)
    except MemoryError as exc:
        raise InvalidInputError(f"Not enough memory for the dose-influence matrix ({estimate}); use a "
                                "coarser dose grid or a smaller lateral cut-off") from exc
    timings = {"preparation": time.perf_counter() - t_start, "ray tracing and kernels": 0.0,
               "bixel doses": 0.0, "matrix assembly": 0.0}
    indptr = np.zeros(n_bix + 1, dtype=np.int64)
    nnz = 0
    col = 0
    kernel_ssds, ray_ssds = [], []
    for bi, (br, (r0, cmat, ranges, upper)) in enumerate(zip(beams, geometry)):
        report(progress, bi / len(beams), f"Beam {bi + 1}/{len(beams)}: ray tracing", cancel)
        t0 = time.perf_counter()
        setup = _setup_beam(br, density, dose_grid, calc, machine, ssd_density_threshold, lateral_cutoff_mm)
        kernel_ssds.append(setup.kernel_ssd_mm)
        ray_ssds.append(setup.ray_ssd_mm)
        table, step = lateral_kernel_table(machine, setup.kernel_ssd_mm, br.beam.bixel_width_mm,
                                           lateral_cutoff_mm + 2.0)
        # The profile is symmetric in x and z: keep the quadrant x, z >= 0 (4x less cache).
        half = (table.shape[0] - 1) // 2
        table = np.ascontiguousarray(table[half:, half:, :])
        timings["ray tracing and kernels"] += time.perf_counter() - t0
        # Chunks of bixels whose candidates fit the buffer (at least one bixel each).
        b0 = 0
        while b0 < br.n_rays:
            b1 = b0 + 1
            total = upper[b0]
            while b1 < br.n_rays and total + upper[b1] <= chunk:
                total += upper[b1]
                b1 += 1
            report(progress, (bi + b0 / br.n_rays) / len(beams),
                   f"Beam {bi + 1}/{len(beams)}: bixels {b0 + 1}-{b1} of {br.n_rays}", cancel)
            offsets = np.zeros(b1 - b0 + 1, np.int64)
            np.cumsum(upper[b0:b1], out=offsets[1:])
            counts = np.empty(b1 - b0, np.int64)
            t0 = time.perf_counter()
            _fill_bixels(setup.slot_map, setup.factors, r0[b0:b1], cmat[b0:b1], ranges[b0:b1], c2,
                         machine.sad_mm, table, 1.0 / step, float(rel_threshold), offsets,
                         buf_rows, buf_vals, counts)
            t1 = time.perf_counter()
            timings["bixel doses"] += t1 - t0
            indptr[col + 1:col + 1 + b1 - b0] = nnz + np.cumsum(counts)
            nnz = _append(buf_rows, buf_vals, offsets, counts, rows, vals, nnz)
            timings["matrix assembly"] += time.perf_counter() - t1
            col += b1 - b0
            b0 = b1
        if indptr[col] == indptr[col - br.n_rays]:
            raise GeometryError(
                f"Beam {bi} (gantry {br.beam.gantry_deg:g}°, couch {br.beam.couch_deg:g}°) deposits no dose in the "
                "calculation region: it misses the patient. Check the isocentre, angles and rays")
    del buf_rows, buf_vals
    # Shrinking reallocates in place: no second copy of the matrix.
    rows.resize(nnz, refcheck=False)
    vals.resize(nnz, refcheck=False)
    from scipy import sparse

    idx_type = np.int32 if nnz < 2**31 - 1 else np.int64
    matrix = sparse.csc_matrix((vals, rows.astype(idx_type, copy=False), indptr.astype(idx_type)),
                               shape=(estimate.n_voxels, n_bix), copy=False)
    matrix.has_sorted_indices = True
    dij = DoseInfluence(matrix, dose_grid, list(beams))
    seconds = time.perf_counter() - t_start
    logger.info("dij: %d bixels, %d non-zeros, %.1f MiB, %.1f s", n_bix, nnz, dij.nbytes / 2**20, seconds)
    report(progress, 1.0, f"Dose influence: {nnz / 1e6:.1f} M non-zeros, {dij.nbytes / 2**20:.0f} MiB", cancel)
    if stats is not None:
        stats.update(nnz=int(nnz), bytes=int(dij.nbytes), seconds=seconds, estimate=estimate, timings=timings,
                     kernel_ssd_mm=np.array(kernel_ssds), ray_ssd_mm=ray_ssds)
    return dij
