"""Small planning cases for the DigitalTwin and ToxicityMonitor tests (imported by the test modules)."""

from __future__ import annotations

import numpy as np

from twinrt.model import Case, Dose, Image, Structure


def cropped_sample() -> Case:
    """The bundled sample patient cropped to the box around its body (+2 voxels): about 0.3 M voxels,
    so that a simulated fraction and its twin update take about a second each."""
    from scipy import ndimage

    from twinrt.sample import load_sample_case

    case = load_sample_case()
    body = ndimage.binary_fill_holes(case.ct.array > -300)
    idx = np.nonzero(body)
    lo = [max(int(i.min()) - 2, 0) for i in idx]
    hi = [min(int(i.max()) + 3, n) for i, n in zip(idx, case.ct.grid.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = case.ct.grid.subgrid(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    structures = [Structure(s.name, s.mask[box], grid, s.color, s.type) for s in case.structures]
    doses = {k: Dose(d.resampled(case.ct.grid).array[box], grid, d.name) for k, d in case.doses.items()}
    return Case(case.patient_id, Image(case.ct.array[box], grid), structures, doses, [], dict(case.metadata))
