"""Bixels (rays) of a beam: the target projected onto the isocentre plane on a bixel lattice.

This is pyRadPlan's ``StfGeneratorPhotonIMRT`` (matRad's ``matRad_generateStf``) for photons:

1. the target is dilated by a box of ``ceil(max(voxel size, margin) / voxel size)`` voxels per
   axis, where the margin is the bixel width (``_computed_target_margin``; 2 voxels on TG-119);
2. every dilated-target voxel centre is rotated into the beam's eye view and projected from the
   source onto the isocentre plane (``x·SAD/(SAD + y_bev)``);
3. the projections are rounded to the bixel lattice (``bixel_width · round(x / bixel_width)``,
   numpy's round-half-to-even, like pyRadPlan) and made unique, which sorts them by x_bev then
   z_bev;
4. if the bixel is smaller than the largest voxel side, neighbouring lattice points are added so
   that the coarse voxels leave no holes (matRad's padding).
"""

from __future__ import annotations

import math

import numpy as np

from twinrt.errors import InvalidInputError, StructureError
from twinrt.geometry import Grid
from twinrt.planning.beams import Beam, BeamRays


def dilate_target(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
    """The target dilated by pyRadPlan's box margin (see module docstring, step 1).

    :param mask: bool (k, j, i) target mask on ``grid``.
    :param margin_mm: margin (mm); pyRadPlan uses the bixel width.
    :return: bool (k, j, i) dilated mask.
    """
    from scipy import ndimage

    sp = np.asarray(grid.spacing_mm, dtype=float)              # (i, j, k)
    radius_ijk = np.ceil(np.maximum(sp, margin_mm) / sp).astype(int)
    r_kji = radius_ijk[::-1]
    size_kji = tuple(int(2 * r + 1) for r in r_kji)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return out
    # Dilate only the target's bounding box (plus the margin): a whole-CT dilation per beam costs
    # seconds on a large grid and gives the same result.
    lo = np.maximum(idx.min(axis=0) - r_kji, 0)
    hi = np.minimum(idx.max(axis=0) + r_kji + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out[box] = ndimage.binary_dilation(mask[box], structure=np.ones(size_kji, dtype=bool))
    return out


def ray_positions(beam: Beam, target_mask: np.ndarray, grid: Grid, margin_mm: float | None = None) -> np.ndarray:
    """Bixel centres ``(x_bev, 0, z_bev)`` (mm) in the isocentre plane, sorted by x_bev then z_bev.

    :param beam: the beam (angles, isocentre, SAD, bixel width).
    :param target_mask: bool (k, j, i) target mask on ``grid`` (usually the CT grid).
    :param margin_mm: dilation margin (mm); default the bixel width, as pyRadPlan.
    :return: (n, 3) ray positions in mm.
    """
    grid.check_array(target_mask, "target mask")
    if not np.any(target_mask):
        raise StructureError("The target structure is empty: contour the target before generating beams", None)
    margin = beam.bixel_width_mm if margin_mm is None else float(margin_mm)
    dilated = dilate_target(target_mask, grid, margin)
    kji = np.argwhere(dilated)
    pts = grid.index_to_lps(kji[:, ::-1].astype(float))
    bev = beam.lps_to_bev(pts)
    depth_from_source = beam.sad_mm + bev[:, 1]
    if np.any(depth_from_source <= 0):
        raise InvalidInputError(
            f"Part of the target lies behind the source of the beam at gantry {beam.gantry_deg:g}°, "
            f"couch {beam.couch_deg:g}°: move the isocentre into the target or increase the SAD")
    scale = beam.sad_mm / depth_from_source
    proj = np.stack([bev[:, 0] * scale, np.zeros(len(bev)), bev[:, 2] * scale], axis=1)
    bw = beam.bixel_width_mm
    lattice = bw * np.round(proj / bw)
    rays = np.unique(lattice, axis=0)
    max_res = max(grid.spacing_mm)
    if bw < max_res:
        # matRad's padding for bixels finer than the CT: add the lattice neighbours of every ray.
        n = math.floor(max_res / bw)
        shifts = [(j * bw, 0.0, k * bw) for j in range(-n, n) for k in range(-n, n) if abs(j) + abs(k) > 0]
        rays = np.unique(np.concatenate([rays] + [rays + np.array(s) for s in shifts]), axis=0)
    # np.unique(axis=0) sorts rows lexicographically: x_bev, then y (0), then z_bev.
    return rays


def generate_rays(beam: Beam, target_mask: np.ndarray, grid: Grid, body_mask: np.ndarray | None = None,
                  margin_mm: float | None = None) -> BeamRays:
    """The bixels of one beam that cover the (dilated) target.

    :param beam: the beam.
    :param target_mask: bool (k, j, i) target mask on ``grid``.
    :param grid: the grid of the masks (usually the CT grid).
    :param body_mask: optional bool (k, j, i) body (external) mask on ``grid``; a target with no
        voxel inside it is refused.
    :param margin_mm: dilation margin (mm); default the bixel width.
    :return: :class:`BeamRays` with rays sorted by x_bev then z_bev.
    """
    target = np.asarray(target_mask, dtype=bool)
    grid.check_array(target, "target mask")
    if not target.any():
        raise StructureError("The target structure is empty: contour the target before generating beams", None)
    if body_mask is not None:
        body = np.asarray(body_mask, dtype=bool)
        grid.check_array(body, "body mask")
        if not np.any(target & body):
            raise StructureError("The target lies outside the body: check that the target and body contours "
                                 "belong to the same patient and image", None)
    return BeamRays(beam, ray_positions(beam, target, grid, margin_mm))
