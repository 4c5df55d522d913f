"""Siddon ray tracing through a voxel grid (numba): path lengths, radiological depth and SSD.

Siddon, "Fast calculation of the exact radiological path for a three-dimensional CT array",
Med. Phys. 12(2), 1985, walked voxel by voxel (the incremental form of Jacobs et al. 1998 and
Amanatides & Woo 1987): a ray visits the voxels it crosses in order, and the length inside each is
the difference of the ray parameters at consecutive plane crossings.

Work is done in continuous index space ``(i, j, k)`` (voxel centres at integers, faces at
half-integers), which is an affine image of patient LPS; ray parameters are invariant under affine
maps, so lengths in mm are parameter differences times the ray's length in mm. This handles any
orthonormal grid direction.

:func:`beam_depth_cube` is pyRadPlan's ``RayTracerBase.trace_cubes`` (matRad's
``matRad_rayTracing``) re-implemented: rays from the source through a lattice of points in a plane
behind the grid, spaced ``min(voxel size)/√2``; each voxel takes the radiological depth of the ray
whose lattice point its centre projects onto (half-open square, as pyRadPlan's
``select_rad_depth_segments``), evaluated at the middle of that ray's segment in the voxel. Only
the rays that own a requested voxel are traced.
"""

from __future__ import annotations

import numba
import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid


@numba.njit(cache=True, nogil=True)
def _siddon_walk(a, b, box, ni, nj, out_flat, out_a0, out_a1):  # pragma: no cover - numba
    """Walk the ray ``a + α (b − a)``, α in [0, 1], through a box of voxels in index space.

    ``box`` is (i0, i1, j0, j1, k0, k1), half-open voxel index ranges inside an (nk, nj, ni)
    grid. Writes the flat C index ``(k*nj + j)*ni + i``, entry α and exit α of every crossed
    voxel (zero-length touches are skipped) and returns how many were written.
    """
    d = (b[0] - a[0], b[1] - a[1], b[2] - a[2])
    amin = 0.0
    amax = 1.0
    for ax in range(3):
        lo = box[2 * ax] - 0.5
        hi = box[2 * ax + 1] - 0.5
        if d[ax] == 0.0:
            if a[ax] < lo or a[ax] > hi:
                return 0
            continue
        t0 = (lo - a[ax]) / d[ax]
        t1 = (hi - a[ax]) / d[ax]
        if t0 > t1:
            t0, t1 = t1, t0
        amin = max(amin, t0)
        amax = min(amax, t1)
    if amax <= amin:
        return 0
    idx = np.empty(3, np.int64)
    step = np.empty(3, np.int64)
    tnext = np.empty(3, np.float64)
    tdelta = np.empty(3, np.float64)
    for ax in range(3):
        p = a[ax] + amin * d[ax]
        # At the entry face the position is on a plane: pick the voxel ahead of the ray.
        if d[ax] > 0.0:
            v = int(np.floor(p + 0.5))
        elif d[ax] < 0.0:
            v = int(np.ceil(p - 0.5))
        else:
            v = int(np.floor(p + 0.5))
        v = min(max(v, box[2 * ax]), box[2 * ax + 1] - 1)
        idx[ax] = v
        if d[ax] > 0.0:
            step[ax] = 1
            tnext[ax] = (v + 0.5 - a[ax]) / d[ax]
            tdelta[ax] = 1.0 / d[ax]
        elif d[ax] < 0.0:
            step[ax] = -1
            tnext[ax] = (v - 0.5 - a[ax]) / d[ax]
            tdelta[ax] = -1.0 / d[ax]
        else:
            step[ax] = 0
            tnext[ax] = np.inf
            tdelta[ax] = np.inf
    count = 0
    alpha = amin
    while alpha < amax:
        ax = 0
        if tnext[1] < tnext[ax]:
            ax = 1
        if tnext[2] < tnext[ax]:
            ax = 2
        nxt = tnext[ax]
        a1 = min(nxt, amax)
        if a1 > alpha:
            out_flat[count] = (idx[2] * nj + idx[1]) * ni + idx[0]
            out_a0[count] = alpha
            out_a1[count] = a1
            count += 1
        alpha = a1
        if nxt >= amax:
            break
        idx[ax] += step[ax]
        tnext[ax] += tdelta[ax]
        if idx[ax] < box[2 * ax] or idx[ax] >= box[2 * ax + 1]:
            break
    return count


@numba.njit(cache=True, nogil=True)
def _n_blocks(n):  # pragma: no cover - numba
    # Enough blocks to balance two to a few dozen threads; per-block (not per-ray) scratch
    # buffers, because allocating inside a parallel loop serialises on the allocator.
    return min(n, 64)


@numba.njit(cache=True, parallel=True)
def _depths_to_points(density, src, pts, lengths_mm, box, ni, nj, nk, out):  # pragma: no cover - numba
    nmax = ni + nj + nk + 4
    n = pts.shape[0]
    nb = _n_blocks(n)
    for blk in numba.prange(nb):
        flat = np.empty(nmax, np.int64)
        a0 = np.empty(nmax, np.float64)
        a1 = np.empty(nmax, np.float64)
        for p in range(blk * n // nb, (blk + 1) * n // nb):
            cnt = _siddon_walk(src, pts[p], box, ni, nj, flat, a0, a1)
            acc = 0.0
            for s in range(cnt):
                acc += (a1[s] - a0[s]) * lengths_mm[p] * density[flat[s]]
            out[p] = acc


@numba.njit(cache=True, parallel=True)
def _ssd_of_rays(density, src, pts, lengths_mm, threshold, box, ni, nj, nk, out):  # pragma: no cover - numba
    nmax = ni + nj + nk + 4
    n = pts.shape[0]
    nb = _n_blocks(n)
    for blk in numba.prange(nb):
        flat = np.empty(nmax, np.int64)
        a0 = np.empty(nmax, np.float64)
        a1 = np.empty(nmax, np.float64)
        for p in range(blk * n // nb, (blk + 1) * n // nb):
            cnt = _siddon_walk(src, pts[p], box, ni, nj, flat, a0, a1)
            out[p] = np.nan
            for s in range(cnt):
                if density[flat[s]] > threshold:
                    out[p] = a0[s] * lengths_mm[p]
                    break


@numba.njit(cache=True, parallel=True)
def _owner_lattice(flat_ix, ni, nj, m, off, y_far, spacing, ox, oz, ok):  # pragma: no cover - numba
    """Lattice point (ox, oz) in the far plane that each voxel's centre projects onto."""
    for v in numba.prange(flat_ix.shape[0]):
        f = flat_ix[v]
        i = f % ni
        j = (f // ni) % nj
        k = f // (ni * nj)
        x = off[0] + m[0, 0] * i + m[0, 1] * j + m[0, 2] * k
        y = off[1] + m[1, 0] * i + m[1, 1] * j + m[1, 2] * k
        z = off[2] + m[2, 0] * i + m[2, 1] * j + m[2, 2] * k
        if y <= 1e-6:
            ok[v] = False
            ox[v] = 0
            oz[v] = 0
            continue
        ok[v] = True
        # Half-open square (-s/2, s/2] around each lattice point, as pyRadPlan selects segments.
        ox[v] = int(np.ceil(x * y_far / y / spacing - 0.5))
        oz[v] = int(np.ceil(z * y_far / y / spacing - 0.5))


@numba.njit(cache=True, parallel=True)
def _trace_owner_rays(density, ray_of_voxel, src_idx, bev_to_idx, ray_ox, ray_oz, y_far, spacing,
                      box, ni, nj, nk, depth):  # pragma: no cover - numba
    nmax = ni + nj + nk + 4
    n = ray_ox.shape[0]
    nb = _n_blocks(n)
    for blk in numba.prange(nb):
        flat = np.empty(nmax, np.int64)
        a0 = np.empty(nmax, np.float64)
        a1 = np.empty(nmax, np.float64)
        tgt = np.empty(3, np.float64)
        for r in range(blk * n // nb, (blk + 1) * n // nb):
            tx = ray_ox[r] * spacing
            tz = ray_oz[r] * spacing
            length = np.sqrt(tx * tx + y_far * y_far + tz * tz)
            for ax in range(3):
                tgt[ax] = src_idx[ax] + bev_to_idx[ax, 0] * tx + bev_to_idx[ax, 1] * y_far + bev_to_idx[ax, 2] * tz
            cnt = _siddon_walk(src_idx, tgt, box, ni, nj, flat, a0, a1)
            acc = 0.0
            for s in range(cnt):
                seg = (a1[s] - a0[s]) * length * density[flat[s]]
                # Only the ray that owns a voxel writes it, so parallel rays never write the same voxel.
                if ray_of_voxel[flat[s]] == r:
                    depth[flat[s]] = acc + 0.5 * seg
                acc += seg


def _check_density(density: np.ndarray, grid: Grid) -> np.ndarray:
    grid.check_array(density, "density")
    d = np.ascontiguousarray(density, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(d)) or (d.size and d.min() < 0):
        raise InvalidInputError("Density must be finite and >= 0 (relative electron density)")
    return d


def _density_box(density: np.ndarray, shape: tuple[int, int, int]) -> tuple[int, int, int, int, int, int]:
    """(i0, i1, j0, j1, k0, k1) bounding the non-zero density; rays need not walk the empty rest."""
    nz = density.reshape(shape) > 0
    if not nz.any():
        return (0, 0, 0, 0, 0, 0)
    out = []
    for axes in ((0, 1), (0, 2), (1, 2)):                    # i, j, k in turn
        hit = np.flatnonzero(nz.any(axis=axes))
        out += [int(hit[0]), int(hit[-1]) + 1]
    return tuple(out)  # type: ignore[return-value]


def _to_index(grid: Grid, points_mm: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(grid.lps_to_index(np.asarray(points_mm, dtype=float)), dtype=np.float64)


def trace_ray(density: np.ndarray, grid: Grid, source_mm: np.ndarray,
              target_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voxels a straight ray crosses and its path length in each.

    :param density: (k, j, i) array on ``grid`` (only its shape is used here).
    :param source_mm: ray start, patient LPS (mm).
    :param target_mm: ray end, patient LPS (mm).
    :return: ``(flat_indices, lengths_mm)``: C-order flat indices of the crossed voxels, in order
        from the source, and the length (mm) of the ray inside each.
    """
    grid.check_array(density, "density")
    nk, nj, ni = grid.shape
    a = _to_index(grid, source_mm).reshape(3)
    b = _to_index(grid, target_mm).reshape(3)
    total = float(np.linalg.norm(np.asarray(target_mm, float) - np.asarray(source_mm, float)))
    nmax = ni + nj + nk + 4
    flat = np.empty(nmax, np.int64)
    a0 = np.empty(nmax, np.float64)
    a1 = np.empty(nmax, np.float64)
    cnt = _siddon_walk(a, b, (0, ni, 0, nj, 0, nk), ni, nj, flat, a0, a1)
    return flat[:cnt].copy(), (a1[:cnt] - a0[:cnt]) * total


def radiological_depth(density: np.ndarray, grid: Grid, source_mm: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Exact radiological depth (mm of water) from the source to each point.

    :param density: (k, j, i) relative electron density on ``grid``; 0 outside the grid.
    :param source_mm: (3,) source position, LPS (mm).
    :param points_mm: (n, 3) end points, LPS (mm).
    :return: (n,) ∫ρ dl along each straight line from the source to the point (mm).
    """
    d = _check_density(density, grid)
    pts_mm = np.atleast_2d(np.asarray(points_mm, dtype=float))
    src_mm = np.asarray(source_mm, dtype=float).reshape(3)
    lengths = np.linalg.norm(pts_mm - src_mm, axis=1)
    out = np.empty(pts_mm.shape[0])
    nk, nj, ni = grid.shape
    _depths_to_points(d, _to_index(grid, src_mm).reshape(3), _to_index(grid, pts_mm), lengths,
                      _density_box(d, grid.shape), ni, nj, nk, out)
    return out


def ssd_along_rays(density: np.ndarray, grid: Grid, source_mm: np.ndarray, targets_mm: np.ndarray,
                   threshold: float = 0.05) -> np.ndarray:
    """Source-to-surface distance along rays: where the density first exceeds ``threshold``.

    Like pyRadPlan's ``_compute_ssd``: the distance (mm) from the source to the entry face of the
    first crossed voxel with density above the threshold (pyRadPlan's default 0.05).

    :param targets_mm: (n, 3) far ends of the rays, LPS (mm); pass points beyond the patient.
    :return: (n,) SSD in mm; NaN for rays that never reach the threshold.
    """
    d = _check_density(density, grid)
    pts_mm = np.atleast_2d(np.asarray(targets_mm, dtype=float))
    src_mm = np.asarray(source_mm, dtype=float).reshape(3)
    lengths = np.linalg.norm(pts_mm - src_mm, axis=1)
    out = np.empty(pts_mm.shape[0])
    nk, nj, ni = grid.shape
    _ssd_of_rays(d, _to_index(grid, src_mm).reshape(3), _to_index(grid, pts_mm), lengths, float(threshold),
                 _density_box(d, grid.shape), ni, nj, nk, out)
    return out


def beam_depth_cube(density: np.ndarray, grid: Grid, source_mm: np.ndarray, rotation: np.ndarray,
                    needed: np.ndarray) -> np.ndarray:
    """Radiological depth (mm) of the ``needed`` voxels for one beam, as pyRadPlan computes it.

    :param density: (k, j, i) relative electron density on ``grid`` (the dose grid).
    :param source_mm: (3,) source position, LPS (mm).
    :param rotation: 3x3 beam rotation ``R`` (``p = iso + R @ p_bev``); the beam travels along
        ``R @ (0, 1, 0)``.
    :param needed: bool (k, j, i) mask of the voxels whose depth is wanted.
    :return: float32 (k, j, i) depth in mm of water; NaN where not needed or behind the source.
    """
    d = _check_density(density, grid)
    grid.check_array(needed, "depth mask")
    nk, nj, ni = grid.shape
    src = np.asarray(source_mm, dtype=float).reshape(3)
    rot = np.asarray(rotation, dtype=float).reshape(3, 3)
    ijk_to_lps = grid.ijk_to_lps()
    # BEV (relative to the source) of voxel (i, j, k): R^T (origin + A (i,j,k) - source).
    m = rot.T @ ijk_to_lps[:3, :3]
    off = rot.T @ (ijk_to_lps[:3, 3] - src)
    corners = np.array([[i, j, k] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)], float)
    # The lattice plane lies one voxel beyond the farthest grid corner (pyRadPlan's ray matrix).
    y_far = float(np.max(corners @ m.T + off, axis=0)[1]) + max(grid.spacing_mm)
    spacing = min(grid.spacing_mm) / np.sqrt(2.0)
    depth = np.full(nk * nj * ni, np.nan, dtype=np.float32)
    flat_ix = np.flatnonzero(np.asarray(needed, dtype=bool).reshape(-1))
    if flat_ix.size == 0 or y_far <= 0:
        return depth.reshape(grid.shape)
    ox = np.empty(flat_ix.size, np.int64)
    oz = np.empty(flat_ix.size, np.int64)
    ok = np.empty(flat_ix.size, np.bool_)
    _owner_lattice(flat_ix, ni, nj, np.ascontiguousarray(m), off, y_far, spacing, ox, oz, ok)
    flat_ix, ox, oz = flat_ix[ok], ox[ok], oz[ok]
    if flat_ix.size == 0:
        return depth.reshape(grid.shape)
    # Number the lattice points that own a voxel through a dense table of the lattice window
    # (O(n), no sort): only those rays are traced.
    span_z = int(oz.max() - oz.min() + 1)
    keys = (ox - ox.min()) * span_z + (oz - oz.min())
    used = np.zeros(int(keys.max()) + 1, dtype=bool)
    used[keys] = True
    uniq = np.flatnonzero(used)
    ray_number = np.cumsum(used, dtype=np.int64) - 1
    ray_of_voxel = np.full(nk * nj * ni, -1, dtype=np.int32)
    ray_of_voxel[flat_ix] = ray_number[keys].astype(np.int32)
    ray_ox = uniq // span_z + ox.min()
    ray_oz = uniq % span_z + oz.min()
    # A BEV vector (relative to the source) maps to index space by A^-1 R.
    bev_to_idx = np.linalg.inv(ijk_to_lps[:3, :3]) @ rot
    # Walk only the box of non-zero density plus the requested voxels: depth accrues only there.
    kji = np.unravel_index(flat_ix, grid.shape)
    lo = [int(kji[2].min()), int(kji[1].min()), int(kji[0].min())]
    hi = [int(kji[2].max()) + 1, int(kji[1].max()) + 1, int(kji[0].max()) + 1]
    dbox = _density_box(d, grid.shape)
    if dbox[1] > dbox[0]:
        lo = [min(lo[a], dbox[2 * a]) for a in range(3)]
        hi = [max(hi[a], dbox[2 * a + 1]) for a in range(3)]
    box = (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    src_idx = _to_index(grid, src).reshape(3)
    _trace_owner_rays(d, ray_of_voxel, src_idx, np.ascontiguousarray(bev_to_idx), ray_ox.astype(np.int64),
                      ray_oz.astype(np.int64), y_far, spacing, box, ni, nj, nk, depth)
    return depth.reshape(grid.shape)
