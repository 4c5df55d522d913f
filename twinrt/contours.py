"""Binary masks <-> planar contours, as DICOM RTSTRUCT stores structures.

A slice is a constant-k plane of an axis-aligned grid (see :mod:`twinrt.geometry`). In a slice,
polygons are in continuous ``(i, j)`` index coordinates: voxel ``[j, i]`` has its centre at
``(i, j)``.

* :func:`mask_to_contours` traces the boundary of a 2D mask with contourpy at level 0.5 on the
  zero-padded mask. Level 0.5 of the linearly interpolated 0/1 field passes half-way between an
  inside and an outside voxel centre, so every inside centre lies strictly inside the traced
  polygons and every outside centre strictly outside. The padding closes contours of voxels on the
  image border. Outer boundaries and holes are both returned.
* :func:`contours_to_mask` fills with the even-odd (XOR) rule: a voxel is inside when its centre
  is inside an odd number of polygons. That is how the DICOM standard interprets nested contours
  (a contour inside another is a hole) and several islands on one slice, so the two functions
  round-trip a mask exactly.
* :func:`structure_to_contours` and :func:`contours_to_structure_mask` do the same in 3D with
  patient LPS points (mm).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from twinrt.errors import GeometryError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Structure

#: Allowed spread (in slices) of the k index of one contour's points: contours must lie in a slice.
_PLANARITY_TOL_SLICES = 0.25


def _drop_collinear(poly: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on the straight line through their neighbours.

    Marching squares puts a vertex on every cell edge, so a straight run of boundary voxels gives
    many collinear points; dropping them changes nothing in the polygon but shrinks the file.
    """
    if len(poly) < 4:
        return poly
    prev_pt = np.roll(poly, 1, axis=0)
    next_pt = np.roll(poly, -1, axis=0)
    d1 = poly - prev_pt
    d2 = next_pt - poly
    cross = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    # Points are multiples of 0.5 voxel, so an exact-zero test with a tiny tolerance is safe.
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return poly
    return poly[keep]


def mask_to_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons outlining a 2D mask (outer boundaries and holes).

    :param mask2d: (nj, ni) boolean array of one slice.
    :return: list of (N, 2) float arrays of ``(i, j)`` continuous index coordinates (voxel units);
        each polygon is closed implicitly (the last point is *not* a repeat of the first).
    """
    import contourpy  # shipped with matplotlib; imported here to keep module import cheap

    mask2d = np.asarray(mask2d, dtype=bool)
    if mask2d.ndim != 2:
        raise GeometryError(f"mask_to_contours needs a 2D (j, i) slice, got shape {mask2d.shape}")
    if not mask2d.any():
        return []
    # Crop to the bounding box (plus the 1-voxel zero border contourpy needs to close every loop):
    # tracing a small window is much faster than a full slice for small organs.
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    j0, j1, i0, i1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    padded = np.zeros((j1 - j0 + 2, i1 - i0 + 2), dtype=np.float64)
    padded[1:-1, 1:-1] = mask2d[j0:j1, i0:i1]
    gen = contourpy.contour_generator(z=padded, name="serial", corner_mask=False,
                                      line_type=contourpy.LineType.Separate)
    polygons = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        # contourpy's x is the column (i) and y the row (j) of the padded window.
        pts = pts + np.array([i0 - 1.0, j0 - 1.0])
        polygons.append(_drop_collinear(pts))
    return polygons


def contours_to_mask(polygons: Sequence[np.ndarray], shape2d: tuple[int, int]) -> np.ndarray:
    """Fill polygons with the even-odd rule, testing voxel centres.

    Vectorised scanline: every polygon edge is intersected with the rows (j = 0..nj-1) it crosses
    (half-open in j so that a vertex exactly on a row is counted once); each crossing toggles all
    voxels to its right. Summing toggles over *all* polygons and taking the parity is the XOR of
    the polygons, i.e. holes and islands as DICOM defines them.

    :param polygons: (N, 2) arrays of ``(i, j)`` continuous index coordinates; closing the polygon
        (repeating the first point) is optional. Points may lie outside the slice.
    :param shape2d: ``(nj, ni)`` of the slice.
    :return: (nj, ni) boolean mask.
    """
    nj, ni = int(shape2d[0]), int(shape2d[1])
    starts, ends = [], []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(p) < 3:
            continue
        starts.append(p)
        ends.append(np.roll(p, -1, axis=0))
    if not starts:
        return np.zeros((nj, ni), dtype=bool)
    a = np.concatenate(starts)
    b = np.concatenate(ends)
    ya, yb = a[:, 1], b[:, 1]
    ymin, ymax = np.minimum(ya, yb), np.maximum(ya, yb)
    # Rows j with ymin <= j < ymax, clipped to the slice; horizontal edges cross no row.
    r0 = np.clip(np.ceil(ymin), 0, nj).astype(np.int64)
    r1 = np.clip(np.ceil(ymax), 0, nj).astype(np.int64)
    counts = np.maximum(r1 - r0, 0)
    total = int(counts.sum())
    toggles = np.zeros((nj, ni + 1), dtype=np.int32)
    if total:
        edge = np.repeat(np.arange(len(a)), counts)
        # Row of each crossing: r0 of its edge plus its rank within the edge.
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = r0[edge] + offsets
        xa, xb = a[edge, 0], b[edge, 0]
        t = (rows - ya[edge]) / (yb[edge] - ya[edge])
        x = xa + t * (xb - xa)
        # Voxels with centre i > x are right of the crossing.
        first = np.clip(np.floor(x).astype(np.int64) + 1, 0, ni)
        np.add.at(toggles, (rows, first), 1)
    parity = np.cumsum(toggles, axis=1)[:, :ni] & 1
    return parity.astype(bool)


def _check_axis_aligned(grid: Grid, what: str) -> None:
    if not grid.is_axis_aligned:
        raise GeometryError(f"{what}: the image grid is oblique (direction\n{grid.direction}); planar "
                            "contours need an axis-aligned grid: resample the image to an axis-aligned grid first")


def structure_to_contours(structure: Structure) -> list[tuple[int, np.ndarray]]:
    """Planar contours of a structure, one group per slice that has voxels.

    :param structure: structure whose mask is on an axis-aligned grid (direction may be any signed
        permutation of the identity).
    :return: list of ``(k, polygon)`` with ``polygon`` an (N, 3) array of LPS points in mm, all in
        the plane of slice ``k``; in increasing k order.
    """
    grid = structure.grid
    _check_axis_aligned(grid, f"Structure '{structure.name}'")
    out: list[tuple[int, np.ndarray]] = []
    for k in np.flatnonzero(structure.mask.any(axis=(1, 2))):
        for poly in mask_to_contours(structure.mask[k]):
            ijk = np.column_stack([poly, np.full(len(poly), float(k))])
            out.append((int(k), grid.index_to_lps(ijk)))
    return out


def contours_to_structure_mask(contours_lps: Sequence[np.ndarray], grid: Grid,
                               name: str = "structure") -> np.ndarray:
    """Rasterise planar LPS contours onto a grid (even-odd rule per slice).

    Each contour is assigned to the slice whose plane is nearest (within half a slice). Contours of
    the same plane are XOR-ed, so nested contours are holes; when contours of several planes map to
    one slice, only the plane nearest to the slice centre is used.

    :param contours_lps: (N, 3) arrays of LPS points in mm, each a closed planar polygon.
    :param grid: target grid (axis-aligned; usually the CT grid).
    :param name: structure name, used in error messages.
    :return: boolean (k, j, i) mask on ``grid``.
    :raises StructureError: a contour lies off the image's slices, is not in a slice plane, or is
        entirely outside the image in-plane.
    """
    _check_axis_aligned(grid, f"Structure '{name}'")
    nk, nj, ni = grid.shape
    by_slice: dict[int, list[tuple[float, np.ndarray]]] = {}
    for c in contours_lps:
        pts = np.asarray(c, dtype=np.float64).reshape(-1, 3)
        if len(pts) < 3:
            continue  # a point or a line encloses no voxel centre
        ijk = grid.lps_to_index(pts)
        kmin, kmax = float(ijk[:, 2].min()), float(ijk[:, 2].max())
        if kmax - kmin > _PLANARITY_TOL_SLICES * 2:
            raise StructureError(
                f"Structure '{name}' has a contour that is not in one image slice (it spans slices "
                f"{kmin:.2f} to {kmax:.2f}); contours must lie in the CT's slice planes: load the CT the "
                "structures were drawn on", name)
        kc = 0.5 * (kmin + kmax)
        k = int(np.floor(kc + 0.5))
        if k < 0 or k >= nk:
            z = float(pts[:, 2].mean())
            raise StructureError(
                f"Structure '{name}' has a contour at z = {z:.2f} mm, outside the image's "
                f"{nk} slices; load the CT the structures were drawn on (or one covering them)", name)
        lo, hi = ijk[:, :2].min(axis=0), ijk[:, :2].max(axis=0)
        if hi[0] < -0.5 or lo[0] > ni - 0.5 or hi[1] < -0.5 or lo[1] > nj - 0.5:
            raise StructureError(
                f"Structure '{name}' has a contour on slice {k} that lies entirely outside the image; "
                "load the CT the structures were drawn on", name)
        by_slice.setdefault(k, []).append((kc, ijk[:, :2]))
    mask = np.zeros(grid.shape, dtype=bool)
    for k, items in by_slice.items():
        # Contours from two different planes can fall within half a slice of the same slice k (an
        # RTSTRUCT drawn on thinner slices than the CT). XOR-ing them would punch false holes, so
        # keep only the plane nearest to the slice centre.
        best = min(items, key=lambda it: abs(it[0] - k))[0]
        polys = [p for kc, p in items if abs(kc - best) < 1e-3]
        mask[k] = contours_to_mask(polys, (nj, ni))
    return mask
