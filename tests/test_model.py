"""Patient model: validation of structures, doses and cases."""

import numpy as np
import pytest

from twinrt.errors import DoseError, GeometryError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType


@pytest.fixture
def grid():
    return Grid((10, 12, 14), (2.0, 2.0, 3.0), (-13.0, -11.0, -13.5))


def test_structure_volume_and_type(grid):
    m = np.zeros(grid.shape, bool)
    m[2:4, 2:5, 2:6] = True
    s = Structure("PTV70", m, grid, type=StructureType.guess("PTV70"))
    assert s.type == StructureType.TARGET
    assert s.volume_cc == pytest.approx(2 * 3 * 4 * 0.012)
    assert StructureType.guess("BODY") == StructureType.EXTERNAL
    assert StructureType.guess("Brainstem") == StructureType.ORGAN


def test_structure_mask_on_other_grid_keeps_volume(grid):
    m = np.zeros(grid.shape, bool)
    m[2:8, 3:9, 4:10] = True
    s = Structure("Box", m, grid)
    fine = Grid((20, 24, 28), (1.0, 1.0, 1.5), tuple(np.array(grid.origin_mm) - [0.5, 0.5, 0.75]))
    fm = s.on_grid(fine)
    # Trilinear thresholding at 0.5 drops only the 8 box corners (0.75**3 < 0.5).
    assert fm.sum() * fine.voxel_volume_cc == pytest.approx(s.volume_cc - 8 * fine.voxel_volume_cc, rel=1e-6)


def test_structure_mask_must_match_grid(grid):
    with pytest.raises(GeometryError, match="Box"):
        Structure("Box", np.zeros((3, 3, 3), bool), grid)


@pytest.mark.parametrize("value", [np.nan, np.inf, -1.0])
def test_dose_rejects_nan_inf_and_negative(grid, value):
    a = np.ones(grid.shape, np.float32)
    a[1, 1, 1] = value
    with pytest.raises(DoseError, match="plan"):
        Dose(a, grid, name="plan")


def test_dose_resampling_zero_outside_and_exact_inside(grid):
    a = np.full(grid.shape, 2.0, np.float32)
    d = Dose(a, grid)
    bigger = Grid((12, 14, 16), grid.spacing_mm, tuple(np.array(grid.origin_mm) - np.array(grid.spacing_mm)))
    r = d.resampled(bigger)
    assert r.array[1:-1, 1:-1, 1:-1].min() == pytest.approx(2.0)
    assert r.array[0].max() == 0.0


def test_case_rejects_duplicate_names_and_finds_structures(grid):
    ct = Image(np.zeros(grid.shape, np.int16), grid)
    m = np.zeros(grid.shape, bool)
    m[1, 1, 1] = True
    with pytest.raises(StructureError, match="Duplicate"):
        Case("p", ct, [Structure("A", m, grid), Structure("A", m, grid)])
    c = Case("p", ct, [Structure("Brainstem", m, grid)])
    assert c.structure("brainstem").name == "Brainstem"
    with pytest.raises(StructureError, match="available: Brainstem"):
        c.structure("Cord")
    with pytest.raises(StructureError, match="already exists"):
        c.add_structure(Structure("BRAINSTEM", m, grid))


def test_prescription_validation():
    p = Prescription("PTV70", 70.0, 35)
    assert p.dose_per_fraction_gy == pytest.approx(2.0)
    with pytest.raises(ValueError):
        Prescription("PTV70", -1.0, 35)
