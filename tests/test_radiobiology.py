"""Linear-quadratic BED/EQD2 (foundation of issues 7 and 8): analytic values and α/β per structure."""

from __future__ import annotations

import numpy as np
import pytest

from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.model import Structure, StructureType
from twinrt.radiobiology import (ALPHA_BETA_GY, alpha_beta_for, alpha_beta_map, bed_from_fractions, bed_uniform,
                                 eqd2)


def test_textbook_values():
    # 70 Gy in 35 fractions: BED 84 Gy10, EQD2 70 Gy for any α/β (2 Gy fractions).
    assert bed_uniform(70.0, 35, 10.0) == pytest.approx(84.0)
    assert bed_uniform(70.0, 35, 3.0) == pytest.approx(70.0 * (1 + 2 / 3))
    assert eqd2(bed_uniform(70.0, 35, 3.0), 3.0) == pytest.approx(70.0)
    # 60 Gy in 20 fractions of 3 Gy, α/β 10: BED 78, EQD2 65.
    assert bed_uniform(60.0, 20, 10.0) == pytest.approx(78.0)
    assert eqd2(78.0, 10.0) == pytest.approx(65.0)


def test_fractions_voxel_by_voxel_and_uneven():
    doses = [np.array([2.0, 0.0, 3.0]), np.array([2.0, 1.0, 1.0])]
    bed = bed_from_fractions(doses, 3.0)
    assert bed == pytest.approx([2 * 2 * (1 + 2 / 3), 1 * (1 + 1 / 3), 3 * (1 + 1) + 1 * (1 + 1 / 3)])
    # Uneven fractions with the same total give a higher BED than even ones.
    assert bed_from_fractions([3.0, 1.0], 3.0) > bed_from_fractions([2.0, 2.0], 3.0)
    # A per-voxel α/β map.
    assert bed_from_fractions([np.array([2.0, 2.0])], np.array([10.0, 2.0])) == pytest.approx([2.4, 4.0])


def test_bad_input_is_refused():
    with pytest.raises(InvalidInputError, match="positive"):
        bed_uniform(70.0, 35, 0.0)
    with pytest.raises(InvalidInputError, match="negative"):
        bed_from_fractions([np.array([-1.0])], 3.0)
    with pytest.raises(InvalidInputError, match="NaN"):
        bed_from_fractions([np.array([np.nan])], 3.0)
    with pytest.raises(InvalidInputError, match="shape"):
        bed_from_fractions([np.zeros(2), np.zeros(3)], 3.0)
    with pytest.raises(InvalidInputError, match="at least one"):
        bed_from_fractions([], 3.0)
    with pytest.raises(InvalidInputError, match="fractions"):
        bed_uniform(70.0, 0, 3.0)


def test_alpha_beta_per_structure():
    assert alpha_beta_for("PTV70", is_target=True) == ALPHA_BETA_GY["tumour"] == 10.0
    assert alpha_beta_for("Spinal Cord") == alpha_beta_for("Brain_Stem") == 2.0
    assert alpha_beta_for("Parotid_L") == 3.0
    assert alpha_beta_for("Parotid_L", overrides={"Parotid_L": 4.5}) == 4.5


def test_alpha_beta_map_precedence():
    grid = Grid((1, 1, 5), (1.0, 1.0, 1.0))
    def mask(*idx):
        m = np.zeros(grid.shape, bool)
        m[0, 0, list(idx)] = True
        return m
    structures = [Structure("SpinalCord", mask(1, 2), grid), Structure("Parotid_R", mask(2, 3), grid),
                  Structure("PTV70", mask(3), grid, type=StructureType.TARGET)]
    ab = alpha_beta_map(grid.shape, structures)
    # outside: late default; cord: 2; cord ∩ parotid: the smaller (2); parotid ∩ target: tumour
    assert ab[0, 0].tolist() == [3.0, 2.0, 2.0, 10.0, 3.0]
