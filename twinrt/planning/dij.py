"""The dose-influence matrix (dij): dose per unit bixel weight, for every dose-grid voxel.

Rows are dose-grid voxels in C order of the (k, j, i) array (``np.ravel_multi_index``); columns are
bixels, beam after beam, in the order of :attr:`DoseInfluence.beams` and their rays. Values are Gy
for the whole plan per unit weight (float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.planning.beams import BeamRays


@dataclass
class DoseInfluence:
    """Sparse dose-influence matrix on a dose grid.

    :param matrix: ``scipy.sparse.csc_matrix`` of shape (n_voxels, n_bixels), float32, Gy per unit weight.
    :param dose_grid: the grid the rows refer to.
    :param beams: the beams and their rays, in column order.
    """

    matrix: "object"
    dose_grid: Grid
    beams: list[BeamRays]

    def __post_init__(self) -> None:
        n_vox = int(np.prod(self.dose_grid.shape))
        n_bix = sum(b.n_rays for b in self.beams)
        if self.matrix.shape != (n_vox, n_bix):
            raise InvalidInputError(f"dij has shape {self.matrix.shape}, expected ({n_vox} voxels, {n_bix} bixels)")

    @property
    def n_bixels(self) -> int:
        """Number of bixels (columns)."""
        return int(self.matrix.shape[1])

    @property
    def bixel_beam(self) -> np.ndarray:
        """Beam index of every bixel (column)."""
        return np.repeat(np.arange(len(self.beams)), [b.n_rays for b in self.beams])

    @property
    def nbytes(self) -> int:
        """Memory held by the sparse matrix (values and indices), bytes."""
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def dose(self, weights: np.ndarray) -> np.ndarray:
        """Dose (Gy) on the dose grid, (k, j, i), for bixel ``weights`` (>= 0)."""
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != self.n_bixels:
            raise InvalidInputError(f"{w.shape[0]} weights given for {self.n_bixels} bixels")
        return np.asarray(self.matrix @ w, dtype=np.float32).reshape(self.dose_grid.shape)
