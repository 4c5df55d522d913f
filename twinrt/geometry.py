"""The one geometry type of TwinRT: a regular voxel grid in patient LPS coordinates.

Conventions (used everywhere in TwinRT):

* **Array order** is ``(k, j, i)`` = (slice, row, column), exactly what
  ``slicer.util.arrayFromVolume`` returns. ``shape`` is therefore ``(nk, nj, ni)``.
* **Spacing, origin and direction are in (i, j, k) order**, like Slicer, ITK and DICOM:
  ``spacing_mm = (di, dj, dk)``; ``origin_mm`` is the LPS position (mm) of the centre of voxel
  ``[0, 0, 0]``; ``direction`` is a 3x3 matrix whose *columns* are the unit LPS vectors of the i, j
  and k axes.
* **Patient coordinates are DICOM LPS** (+x patient left, +y posterior, +z superior/head), in mm.
  Slicer's RAS is LPS with x and y negated; :meth:`Grid.ijk_to_ras` gives the matrix Slicer's
  ``SetIJKToRASMatrix`` expects.

The LPS position of voxel (i, j, k) is ``origin + direction @ (spacing * (i, j, k))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from twinrt.errors import GeometryError, InvalidInputError

#: LPS <-> RAS: negate x and y (a 4x4 homogeneous matrix, its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """RAS points (..., 3) in mm as LPS (x and y change sign; the conversion is its own inverse)."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


#: The most voxels a grid may have (2³¹ ≈ 2.1 billion: e.g. 2000 slices of 1024 x 1024); larger is a
#: wrong header or unit, not an image TwinRT could hold in memory.
MAX_VOXELS = 2 ** 31


def _as_vec3(values: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        arr = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be three finite numbers, got {values!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} must be three finite numbers, got {values!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in patient LPS (mm).

    :param shape: number of voxels in array order ``(nk, nj, ni)``.
    :param spacing_mm: voxel size in mm along (i, j, k).
    :param origin_mm: LPS position in mm of the centre of voxel [0, 0, 0].
    :param direction: 3x3 matrix; columns are unit LPS vectors of the i, j, k axes.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise InvalidInputError(f"Grid shape must be three positive sizes (nk, nj, ni), got {self.shape!r}") from None
        if len(shape) != 3 or min(shape) < 1:
            raise InvalidInputError(f"Grid shape must be three positive sizes (nk, nj, ni), got {self.shape!r}")
        if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
            raise InvalidInputError(f"A grid of {shape[0]} x {shape[1]} x {shape[2]} voxels is absurdly large "
                                    f"(over {MAX_VOXELS:,}); check the image header (slice count, rows, columns)")
        spacing = _as_vec3(self.spacing_mm, "spacing_mm")
        if min(spacing) <= 0:
            raise InvalidInputError(f"Voxel spacing must be positive (mm), got {spacing!r}")
        direction = np.array(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise GeometryError("Grid direction must be orthonormal (no shear); got\n" + str(direction))
        direction.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", _as_vec3(self.origin_mm, "origin_mm"))
        object.__setattr__(self, "direction", direction)

    # ----------------------------------------------------------------- equality
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return self.is_same(other)

    def __hash__(self) -> int:
        return hash((self.shape, tuple(np.round(self.spacing_mm, 4)), tuple(np.round(self.origin_mm, 3))))

    def is_same(self, other: "Grid", tol_mm: float = 1e-3) -> bool:
        """True when both grids have the same shape and voxel centres (within ``tol_mm``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-6)
        )

    # ----------------------------------------------------------------- matrices
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS (mm)."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_mm)
        m[:3, 3] = self.origin_mm
        return m

    def lps_to_ijk(self) -> np.ndarray:
        """4x4 matrix mapping LPS (mm) to continuous (i, j, k) indices."""
        return np.linalg.inv(self.ijk_to_lps())

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK→RAS matrix, as ``vtkMRMLVolumeNode.SetIJKToRASMatrix`` expects."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: np.ndarray, shape: Sequence[int]) -> "Grid":
        """Build a grid from Slicer's IJK→RAS matrix and an array shape ``(nk, nj, ni)``."""
        m = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        columns = m[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise GeometryError("IJK→RAS matrix has a zero-length axis")
        return cls(tuple(shape), tuple(spacing), tuple(m[:3, 3]), columns / spacing)

    # ----------------------------------------------------------------- points
    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """LPS (mm) of continuous indices; ``ijk`` is (..., 3) in (i, j, k) order."""
        ijk = np.asarray(ijk, dtype=float)
        m = self.ijk_to_lps()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices of LPS points (mm); ``lps`` is (..., 3)."""
        lps = np.asarray(lps, dtype=float)
        m = self.lps_to_ijk()
        return lps @ m[:3, :3].T + m[:3, 3]

    def axis_positions(self, axis: str) -> np.ndarray:
        """LPS coordinate (mm) of each voxel centre along one axis of an axis-aligned grid.

        :param axis: ``"i"``, ``"j"`` or ``"k"``; returns the moving LPS coordinate along it.
        """
        n = {"i": self.shape[2], "j": self.shape[1], "k": self.shape[0]}[axis]
        col = "ijk".index(axis)
        steps = np.arange(n)[:, None] * self.spacing_mm[col] * self.direction[:, col][None, :]
        pts = np.asarray(self.origin_mm) + steps
        return pts[:, int(np.argmax(np.abs(self.direction[:, col])))]

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cc (cm³)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def is_axis_aligned(self) -> bool:
        """True when the direction is a signed permutation of the identity."""
        return bool(np.allclose(np.abs(self.direction), np.round(np.abs(self.direction)), atol=1e-6))

    def extent_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box (min, max) in LPS mm of all voxel centres."""
        corners = np.array([[i, j, k] for i in (0, self.shape[2] - 1) for j in (0, self.shape[1] - 1)
                            for k in (0, self.shape[0] - 1)], dtype=float)
        pts = self.index_to_lps(corners)
        return pts.min(axis=0), pts.max(axis=0)

    def check_array(self, array: np.ndarray, what: str = "array") -> None:
        """Raise :class:`GeometryError` unless ``array.shape`` equals this grid's shape."""
        if tuple(array.shape) != self.shape:
            raise GeometryError(
                f"{what} has shape {tuple(array.shape)} but its grid is {self.shape} (k, j, i); "
                "resample it to the grid first"
            )

    def subgrid(self, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> "Grid":
        """The grid of ``array[k0:k1, j0:j1, i0:i1]`` (half-open index ranges)."""
        origin = self.index_to_lps(np.array([i0, j0, k0], dtype=float))
        return Grid((k1 - k0, j1 - j0, i1 - i0), self.spacing_mm, tuple(origin), self.direction)


def resample_array(array: np.ndarray, source: Grid, target: Grid, order: int = 1,
                   fill_value: float = 0.0) -> np.ndarray:
    """Resample ``array`` from ``source`` to ``target`` grid in patient space.

    :param array: (k, j, i) array on ``source``.
    :param order: 0 nearest neighbour, 1 trilinear (scipy.ndimage.map_coordinates).
    :param fill_value: value for target voxels outside the source grid.
    :return: (k, j, i) array on ``target`` with ``array``'s dtype for order 0, float32 otherwise.
    """
    from scipy import ndimage

    source.check_array(array, "source array")
    if source.is_same(target):
        return array.copy()
    # target ijk -> LPS -> source ijk, applied per voxel via one affine in (k, j, i) order.
    m = source.lps_to_ijk() @ target.ijk_to_lps()
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float)  # (i,j,k) <-> (k,j,i)
    mat = perm @ m[:3, :3] @ perm
    off = perm @ m[:3, 3]
    data = array.astype(np.float32) if order > 0 else array
    out = ndimage.affine_transform(data, mat, offset=off, output_shape=target.shape, order=order,
                                   mode="constant", cval=fill_value, prefilter=False)
    return out


def voxel_centres_lps(grid: Grid) -> np.ndarray:
    """The LPS position (mm) of every voxel centre of ``grid``: (nk, nj, ni, 3) float32."""
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in grid.shape), indexing="ij")
    m = grid.ijk_to_lps().astype(np.float32)
    return np.stack([ii, jj, kk], -1) @ m[:3, :3].T + m[:3, 3]


def sample_at_lps(array: np.ndarray, grid: Grid, points_lps: np.ndarray, order: int = 1, fill_value: float = 0.0,
                  mode: str = "constant") -> np.ndarray:
    """``array`` (on ``grid``) sampled at arbitrary LPS positions (mm), e.g. the points of a deformation.

    :param points_lps: (..., 3) positions; the result has their leading shape.
    :param order: 0 nearest neighbour, 1 trilinear (scipy.ndimage.map_coordinates, no prefilter).
    :param fill_value: value outside ``grid`` (``mode="constant"``); ``mode="nearest"`` extends the edge.
        Positions are float32: a point on the grid's last centre may round just outside it.
    """
    from scipy import ndimage

    m = grid.lps_to_ijk().astype(np.float32)
    ijk = np.asarray(points_lps, dtype=np.float32) @ m[:3, :3].T + m[:3, 3]
    data = np.asarray(array, dtype=np.float32) if order > 0 else np.asarray(array)
    return ndimage.map_coordinates(data, np.stack([ijk[..., 2], ijk[..., 1], ijk[..., 0]]), order=order, mode=mode,
                                   cval=fill_value, prefilter=False)
