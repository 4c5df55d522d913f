"""Leaf sequencing: optimised fluence maps → step-and-shoot MLC segments, and back.

Geometry (beam's eye view, isocentre plane, mm; see :mod:`twinrt.planning.beams`):

* leaves travel along ``x_bev``; with collimator 0 this is the IEC beam-limiting-device X axis,
  so the segments are written to DICOM as an ``MLCX`` device;
* leaf pairs are stacked along ``z_bev`` (IEC Y), each pair covering a band of one leaf width;
* a :class:`FluenceMap` is a 2D array with rows along ``z_bev`` (one row per bixel row) and
  columns along ``x_bev``.

The sequencer is the unidirectional leaf sweep of Bortfeld et al. in its step-and-shoot
("multiple static fields") form:

    T. R. Bortfeld, D. L. Kahler, T. J. Waldron, A. L. Boyer. "X-ray field compensation with
    multileaf collimators." Int. J. Radiat. Oncol. Biol. Phys. 28(3):723-730, 1994.
    doi:10.1016/0360-3016(94)90199-6

Each leaf-pair row of the fluence, quantised to integer levels ``I_j``, is split into its rising
and falling steps. With ``L_j`` the sum of the increases and ``R_j`` the sum of the decreases up
to column ``j`` (so ``I_j = L_j - R_j``), column ``j`` is open during the monitor-unit levels
``u`` with ``R_j < u <= L_j``. For every ``u`` this open set is one interval whose edges only move
in +x as ``u`` grows, so both leaves sweep one way, and the row needs ``L_n`` levels: the sum of
its positive steps, which is the least any unidirectional sequence can use. All rows are swept
together: level ``u`` is one aperture, and consecutive identical apertures merge into one
segment. Delivered fluence equals the quantised fluence exactly (no tongue-and-groove, leaf
transmission or output-factor modelling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.planning.beams import BeamRays

#: Citation of the sequencing algorithm (also written to the RTPLAN beam description).
ALGORITHM_CITATION = ("Bortfeld TR, Kahler DL, Waldron TJ, Boyer AL. X-ray field compensation with multileaf "
                      "collimators. Int J Radiat Oncol Biol Phys 1994;28(3):723-730")

# Positions closer than this fraction of a bixel count as the same lattice point; optimisers
# and DICOM round trips leave ~1e-12 mm of noise on ray positions.
_LATTICE_TOLERANCE = 1e-3


@dataclass
class FluenceMap:
    """One beam's bixel weights on its bixel lattice.

    :param values: (n_rows, n_cols) weights; rows along ``z_bev``, columns along ``x_bev``;
        lattice points without a ray hold 0.
    :param x_mm: (n_cols,) column centres along ``x_bev`` in the isocentre plane (mm).
    :param z_mm: (n_rows,) row centres along ``z_bev`` in the isocentre plane (mm).
    :param bixel_width_mm: lattice spacing (mm).
    :param ray_rows: (n_rays,) row of each ray of the beam, in ray order.
    :param ray_cols: (n_rays,) column of each ray of the beam, in ray order.
    """

    values: np.ndarray
    x_mm: np.ndarray
    z_mm: np.ndarray
    bixel_width_mm: float
    ray_rows: np.ndarray
    ray_cols: np.ndarray

    @property
    def ray_values(self) -> np.ndarray:
        """The map sampled back at each ray (the bixel weights, in ray order)."""
        return self.values[self.ray_rows, self.ray_cols]


@dataclass
class Segment:
    """One static MLC aperture and the monitor units delivered through it.

    :param leaf_boundaries_mm: (n_pairs + 1,) leaf-pair edges along ``z_bev`` (IEC Y), ascending (mm).
    :param left_mm: (n_pairs,) position of the -x (X1, bank A) leaf of each pair (mm at isocentre).
    :param right_mm: (n_pairs,) position of the +x (X2, bank B) leaf of each pair (mm); a pair is
        closed when ``left == right``.
    :param mu: monitor units of the segment (per fraction when built by :func:`sequence_beam`
        through :func:`twinrt.planning.plan.sequence_plan`).
    """

    leaf_boundaries_mm: tuple[float, ...]
    left_mm: tuple[float, ...]
    right_mm: tuple[float, ...]
    mu: float

    def __post_init__(self) -> None:
        # Tuples of floats keep a segment hashable-friendly and JSON-ready (dataclasses.asdict).
        self.leaf_boundaries_mm = tuple(float(v) for v in np.asarray(self.leaf_boundaries_mm).reshape(-1))
        self.left_mm = tuple(float(v) for v in np.asarray(self.left_mm).reshape(-1))
        self.right_mm = tuple(float(v) for v in np.asarray(self.right_mm).reshape(-1))
        self.mu = float(self.mu)
        n = len(self.left_mm)
        if len(self.right_mm) != n or len(self.leaf_boundaries_mm) != n + 1 or n == 0:
            raise InvalidInputError(f"A segment needs n leaf pairs, n left and n right positions and n + 1 "
                                    f"boundaries; got {len(self.left_mm)}, {len(self.right_mm)} and "
                                    f"{len(self.leaf_boundaries_mm)}")
        if np.any(np.diff(self.leaf_boundaries_mm) <= 0):
            raise InvalidInputError("Leaf boundaries must increase strictly (mm along IEC Y)")
        if any(r < left for left, r in zip(self.left_mm, self.right_mm)):
            raise InvalidInputError("A left (X1) leaf is beyond its right (X2) leaf; leaves would collide")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise InvalidInputError(f"Segment MU must be a finite number >= 0, got {self.mu}")

    @property
    def n_pairs(self) -> int:
        """Number of leaf pairs."""
        return len(self.left_mm)

    @property
    def open_pairs(self) -> np.ndarray:
        """Boolean (n_pairs,): pairs with a gap between their leaves."""
        return np.asarray(self.right_mm) > np.asarray(self.left_mm)

    @property
    def area_mm2(self) -> float:
        """Open area of the aperture in the isocentre plane (mm²)."""
        widths = np.diff(self.leaf_boundaries_mm)
        return float(np.sum((np.asarray(self.right_mm) - np.asarray(self.left_mm)) * widths))


def fluence_map(rays: BeamRays, weights: np.ndarray) -> FluenceMap:
    """Place one beam's bixel weights on its 2D bixel lattice.

    :param rays: the beam's rays; their ``(x_bev, 0, z_bev)`` positions must lie on a lattice of
        ``rays.beam.bixel_width_mm`` (as :class:`BeamRays` produces).
    :param weights: (n_rays,) bixel weights of this beam, in ray order, >= 0.
    :return: the fluence map (rows along ``z_bev``, columns along ``x_bev``).
    :raises InvalidInputError: wrong number of weights, negative weights, or rays off the lattice.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != rays.n_rays:
        raise InvalidInputError(f"{w.shape[0]} weights given for a beam with {rays.n_rays} rays")
    if rays.n_rays == 0:
        raise InvalidInputError("The beam has no rays; it cannot be sequenced")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidInputError("Bixel weights must be finite and >= 0")
    width = float(rays.beam.bixel_width_mm)
    x, z = rays.ray_bev_mm[:, 0], rays.ray_bev_mm[:, 2]
    cols, x0 = _lattice_index(x, width, "x_bev")
    rows, z0 = _lattice_index(z, width, "z_bev")
    values = np.zeros((int(rows.max()) + 1, int(cols.max()) + 1))
    # np.add.at so that duplicated rays (which would be a caller bug) add up instead of overwriting.
    np.add.at(values, (rows, cols), w)
    return FluenceMap(values, x0 + width * np.arange(values.shape[1]), z0 + width * np.arange(values.shape[0]),
                      width, rows, cols)


def _lattice_index(coord: np.ndarray, width: float, axis: str) -> tuple[np.ndarray, float]:
    """Lattice index of every coordinate (mm) and the coordinate of index 0."""
    origin = float(coord.min())
    index = np.rint((coord - origin) / width)
    if np.max(np.abs(coord - origin - index * width)) > _LATTICE_TOLERANCE * width:
        raise InvalidInputError(f"Ray positions along {axis} are not on a {width:g} mm bixel lattice; "
                                "build the rays with the beam's bixel width")
    return index.astype(np.intp), origin


def leaf_boundaries(fluence: FluenceMap, leaf_width_mm: float, leaf_origin_mm: float | None = None) -> np.ndarray:
    """Edges (mm along ``z_bev``) of the leaf pairs covering the fluence map.

    :param fluence: the map to cover.
    :param leaf_width_mm: leaf width projected to the isocentre plane (mm).
    :param leaf_origin_mm: a leaf-pair edge of the MLC (mm); default: the lower edge of the first
        bixel row, so that leaves line up with the bixels. Give the MLC's own boundary (e.g. 0 for
        a symmetric MLC with an even number of pairs) to model a real leaf bank.
    :return: (n_pairs + 1,) ascending boundaries.
    """
    if not (leaf_width_mm > 0 and math.isfinite(leaf_width_mm)):
        raise InvalidInputError(f"Leaf width must be a positive number of mm, got {leaf_width_mm}")
    half = fluence.bixel_width_mm / 2
    lo, hi = float(fluence.z_mm[0]) - half, float(fluence.z_mm[-1]) + half
    origin = lo if leaf_origin_mm is None else float(leaf_origin_mm)
    # The tolerance stops float noise from adding an extra, zero-width pair at either end.
    eps = _LATTICE_TOLERANCE * min(leaf_width_mm, fluence.bixel_width_mm) / leaf_width_mm
    first = math.floor((lo - origin) / leaf_width_mm + eps)
    last = math.ceil((hi - origin) / leaf_width_mm - eps)
    return origin + leaf_width_mm * np.arange(first, last + 1, dtype=np.float64)


def _overlap(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
    """Length of the overlap of intervals [lo_a, hi_a] and [lo_b, hi_b] (broadcast), >= 0."""
    return np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)


def quantise(values_mu: np.ndarray, levels: int, min_segment_mu: float = 0.0) -> tuple[np.ndarray, float]:
    """Integer intensity levels of a fluence given in MU, and the MU of one level.

    One level is ``max / levels`` MU, raised to ``min_segment_mu`` when that is larger; this is
    how the minimum segment MU is enforced (see :func:`sequence_beam`).

    :param values_mu: fluence in MU (any shape, >= 0).
    :param levels: number of intensity levels of the maximum (>= 1).
    :param min_segment_mu: least MU of a segment.
    :return: (integer levels, same shape; MU per level). All zero and 0.0 for a zero fluence.
    """
    if int(levels) != levels or levels < 1:
        raise InvalidInputError(f"The number of intensity levels must be an integer >= 1, got {levels}")
    if not (min_segment_mu >= 0 and math.isfinite(min_segment_mu)):
        raise InvalidInputError(f"Minimum segment MU must be a finite number >= 0, got {min_segment_mu}")
    peak = float(np.max(values_mu)) if np.size(values_mu) else 0.0
    if peak <= 0:
        return np.zeros(np.shape(values_mu), dtype=np.int64), 0.0
    unit = max(peak / int(levels), float(min_segment_mu))
    return np.rint(np.asarray(values_mu) / unit).astype(np.int64), unit


def sweep_apertures(levels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Bortfeld et al. (1994) unidirectional sweep of an integer intensity matrix.

    :param levels: (n_pairs, n_cols) non-negative integers.
    :return: segments as (first open column, last open column, number of levels); columns are
        (n_pairs,) integer arrays, -1 for a closed pair. The sum over segments of the number of
        levels times the aperture reproduces ``levels`` exactly.
    """
    levels = np.asarray(levels, dtype=np.int64)
    if levels.ndim != 2 or np.any(levels < 0):
        raise InvalidInputError("The intensity matrix must be 2D with levels >= 0")
    n_pairs, n_cols = levels.shape
    steps = np.diff(levels, axis=1, prepend=0)
    # L (increases) and R (decreases) accumulated along the row: column j is open for R_j < u <= L_j.
    rise = np.cumsum(np.clip(steps, 0, None), axis=1)
    fall = np.cumsum(np.clip(-steps, 0, None), axis=1)
    # The beam needs as many levels as its most modulated row; faster rows close early and wait.
    total = int(rise[:, -1].max()) if n_cols else 0
    segments: list[tuple[np.ndarray, np.ndarray, int]] = []
    for u in range(1, total + 1):
        active = rise[:, -1] >= u
        # rise and fall are non-decreasing along a row, so counting gives the interval edges.
        first = np.where(active, np.sum(rise < u, axis=1), -1)
        last = np.where(active, np.sum(fall < u, axis=1) - 1, -1)
        if segments and np.array_equal(segments[-1][0], first) and np.array_equal(segments[-1][1], last):
            segments[-1] = (first, last, segments[-1][2] + 1)
        else:
            segments.append((first, last, 1))
    return segments


def sequence_beam(fluence: FluenceMap, levels: int = 10, leaf_width_mm: float = 5.0, min_segment_mu: float = 0.0,
                  mu_per_unit_weight: float = 1.0, leaf_origin_mm: float | None = None) -> list[Segment]:
    """Step-and-shoot segments delivering one beam's fluence map (Bortfeld et al. 1994 sweep).

    Steps: (1) each leaf pair gets the mean fluence of the bixel rows its band overlaps
    (area-weighted), which rebins when the leaf width differs from the bixel width; (2) the
    fluence in MU is quantised to ``levels`` levels of the maximum; (3) the rows are swept as
    described in the module docstring; (4) apertures become leaf positions on the bixel edges.

    Minimum segment MU: every segment delivers a whole number (>= 1) of levels, so the limit is
    met by making one level worth at least ``min_segment_mu``; when ``max / levels`` is smaller,
    the quantisation coarsens (fewer levels, rounding to the nearest multiple of
    ``min_segment_mu``) rather than dropping or merging segments, which would change the fluence
    in ways the optimiser never saw. A beam whose peak is below half of ``min_segment_mu`` is not
    delivered (no segments). The loss is reported by :func:`sequencing_loss`.

    :param fluence: the beam's fluence map (bixel weights).
    :param levels: intensity levels of the maximum fluence (>= 1).
    :param leaf_width_mm: leaf width projected to the isocentre plane (mm).
    :param min_segment_mu: least MU of any segment (MU, in the units ``mu_per_unit_weight`` gives,
        per fraction when called from :func:`twinrt.planning.plan.sequence_plan`).
    :param mu_per_unit_weight: MU per unit bixel weight.
    :param leaf_origin_mm: a leaf-pair edge (mm along ``z_bev``); see :func:`leaf_boundaries`.
    :return: segments in delivery order (leaves move towards +x only); empty for a zero fluence.
    """
    if not (mu_per_unit_weight > 0 and math.isfinite(mu_per_unit_weight)):
        raise InvalidInputError(f"MU per unit weight must be a positive number, got {mu_per_unit_weight}")
    bounds = leaf_boundaries(fluence, leaf_width_mm, leaf_origin_mm)
    half = fluence.bixel_width_mm / 2
    # Fraction of each leaf band covered by each bixel row; regions off the lattice carry no fluence.
    cover = _overlap(bounds[:-1, None], bounds[1:, None], fluence.z_mm[None, :] - half,
                     fluence.z_mm[None, :] + half) / np.diff(bounds)[:, None]
    pair_mu = (cover @ fluence.values) * mu_per_unit_weight
    # Quantise in MU (not in weight) so that the minimum-MU limit can act on the level size.
    intensity, unit = quantise(pair_mu, levels, min_segment_mu)
    col_lo, col_hi = fluence.x_mm - half, fluence.x_mm + half
    segments = []
    for first, last, count in sweep_apertures(intensity):
        open_ = first >= 0
        # Closed pairs park where their sweep ends (after their last level) or, for rows that
        # never open, at the -x edge where the sweep starts: both leaves together, no gap.
        finished = ~open_ & (intensity.sum(axis=1) > 0)
        park = np.where(finished, col_hi[-1], col_lo[0])
        left = np.where(open_, col_lo[np.clip(first, 0, None)], park)
        right = np.where(open_, col_hi[np.clip(last, 0, None)], park)
        segments.append(Segment(tuple(bounds), tuple(left), tuple(right), count * unit))
    return segments


def segments_to_weights(segments: list[Segment], rays: BeamRays, mu_per_unit_weight: float = 1.0) -> np.ndarray:
    """The bixel weights the segments deliver: each aperture's fluence averaged over each bixel.

    With ``dij`` the plan's :class:`twinrt.planning.dij.DoseInfluence`, the dose of the
    sequenced beam is ``dij.dose(weights)`` with these weights in the beam's columns.

    :param segments: the beam's segments.
    :param rays: the beam's rays (bixel centres and width).
    :param mu_per_unit_weight: MU per unit bixel weight (the value given to :func:`sequence_beam`).
    :return: (n_rays,) weights in ray order.
    """
    if not (mu_per_unit_weight > 0 and math.isfinite(mu_per_unit_weight)):
        raise InvalidInputError(f"MU per unit weight must be a positive number, got {mu_per_unit_weight}")
    width = float(rays.beam.bixel_width_mm)
    x = rays.ray_bev_mm[:, 0:1]
    z = rays.ray_bev_mm[:, 2:3]
    out = np.zeros(rays.n_rays)
    for seg in segments:
        bounds = np.asarray(seg.leaf_boundaries_mm)
        # Open area of the aperture inside each bixel square, summed over leaf pairs: exact for any
        # leaf width or leaf origin, and exactly the quantised fluence when leaves sit on bixel edges.
        left, right = np.asarray(seg.left_mm)[None, :], np.asarray(seg.right_mm)[None, :]
        dz = _overlap(z - width / 2, z + width / 2, bounds[None, :-1], bounds[None, 1:])
        dx = _overlap(x - width / 2, x + width / 2, left, right)
        out += seg.mu * np.sum(dz * dx, axis=1) / (width * width)
    return out / mu_per_unit_weight


def sequencing_loss(ideal_weights: np.ndarray, delivered_weights: np.ndarray, segments: list[Segment] | None = None,
                    mu_per_unit_weight: float = 1.0) -> dict[str, float | int]:
    """How far the delivered fluence is from the optimised one, and how modulated the beam is.

    :param ideal_weights: optimised bixel weights (one beam or the whole plan).
    :param delivered_weights: weights delivered by the segments (:func:`segments_to_weights`).
    :param segments: the segments (for counts and MU); omit for fluence errors only.
    :param mu_per_unit_weight: MU per unit bixel weight, for the modulation factor.
    :return: ``relative_fluence_error`` (‖delivered − ideal‖₂ / ‖ideal‖₂),
        ``max_fluence_error`` (largest |delivered − ideal| over the ideal maximum), and with
        segments: ``n_segments``, ``total_mu`` (MU) and ``modulation_factor``: total MU over the
        mean MU fluence of the irradiated bixels, i.e. over the MU of an open field giving the same
        mean fluence (1 for a uniform field, 2L/(L+1) for an L-level ramp).
    """
    ideal = np.asarray(ideal_weights, dtype=np.float64).reshape(-1)
    delivered = np.asarray(delivered_weights, dtype=np.float64).reshape(-1)
    if ideal.shape != delivered.shape:
        raise InvalidInputError(f"{ideal.size} ideal and {delivered.size} delivered weights; they must match")
    diff = delivered - ideal
    norm = float(np.linalg.norm(ideal))
    peak = float(np.max(np.abs(ideal))) if ideal.size else 0.0
    out = {"relative_fluence_error": float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff)),
           "max_fluence_error": float(np.max(np.abs(diff))) / peak if peak > 0 else 0.0}
    if segments is not None:
        total_mu = float(sum(s.mu for s in segments))
        lit = delivered[delivered > 0]
        mean_mu = float(lit.mean()) * mu_per_unit_weight if lit.size else 0.0
        out.update(n_segments=len(segments), total_mu=total_mu,
                   modulation_factor=total_mu / mean_mu if mean_mu > 0 else 0.0)
    return out
