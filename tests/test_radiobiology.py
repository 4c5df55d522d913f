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


# ------------------------------------------------------------------------------------------ LKB, gEUD, TCP
from twinrt.radiobiology import (LKB_PARAMETERS, geud, lkb_ntcp, lkb_ntcp_from_voxels,  # noqa: E402
                                 lkb_parameter_set_for, poisson_tcp)


def test_geud_limits():
    d = np.array([10.0, 20.0, 30.0, 60.0])
    v = np.array([0.4, 0.3, 0.2, 0.1])
    assert geud(d, v, 1.0) == pytest.approx(float((d * v).sum()))          # n = 1: mean dose
    assert geud(d, 10 * v, 1.0) == pytest.approx(float((d * v).sum()))     # volumes are normalised
    assert geud(d, v, 1e-3) == pytest.approx(60.0, rel=1e-2)                # n → 0: max dose
    assert geud(d, v, 1e-3) <= 60.0
    assert geud(np.full(5, 42.0), np.ones(5), 0.05) == pytest.approx(42.0)  # uniform dose
    # gEUD grows as n falls (more serial) for a non-uniform dose
    assert geud(d, v, 0.1) > geud(d, v, 0.5) > geud(d, v, 1.0)


def test_lkb_ntcp_values():
    assert lkb_ntcp(66.5, 66.5, 0.175) == pytest.approx(0.5)
    # one m·TD50 above TD50: Φ(1)
    assert lkb_ntcp(66.5 * 1.175, 66.5, 0.175) == pytest.approx(0.8413447, abs=1e-6)
    assert np.all(np.diff(lkb_ntcp(np.linspace(0, 100, 11), 50.0, 0.2)) > 0)
    p = LKB_PARAMETERS["parotid_flow25_dijkema2010"]
    assert lkb_ntcp_from_voxels(np.full(100, 39.9), p) == pytest.approx(0.5)
    assert lkb_ntcp_from_voxels(np.full(100, 39.9), "parotid_flow25_dijkema2010") == pytest.approx(0.5)


def test_poisson_tcp_decreases_with_clonogens_and_dose():
    assert poisson_tcp(0.0) == 1.0 and poisson_tcp(np.log(2)) == pytest.approx(0.5)
    assert poisson_tcp(np.inf) == 0.0
    # N = N0 exp(-α D - β d D) falls with dose, so TCP rises with dose
    dose = np.linspace(40, 80, 9)
    n = 1e9 * np.exp(-0.3 * dose - 0.03 * 2.0 * dose)
    assert np.all(np.diff(poisson_tcp(n)) > 0)


def test_lkb_table_and_organ_mapping():
    for name, p in LKB_PARAMETERS.items():
        assert p.n > 0 and p.m > 0 and p.td50_gy > 0, name
        assert p.source and p.endpoint and p.verification, name
    assert LKB_PARAMETERS["spinal_cord_myelitis_burman1991"].td50_gy == 66.5
    assert lkb_parameter_set_for("SpinalCord") == "spinal_cord_myelitis_burman1991"
    assert lkb_parameter_set_for("Brainstem") == "brainstem_necrosis_burman1991"
    assert lkb_parameter_set_for("Parotid_R") == lkb_parameter_set_for("LeftParotid") == "parotid_flow25_dijkema2010"
    assert lkb_parameter_set_for("Larynx").startswith("larynx")
    assert lkb_parameter_set_for("Esophagus") == "esophagus_stricture_burman1991"
    assert lkb_parameter_set_for("Bone_Mandible") == lkb_parameter_set_for("Mandible") == "mandible_tmj_burman1991"


def test_lkb_bad_input_is_refused():
    with pytest.raises(InvalidInputError, match="No LKB parameter set"):
        lkb_parameter_set_for("Femur_L")
    with pytest.raises(InvalidInputError, match="Unknown LKB"):
        lkb_ntcp_from_voxels(np.ones(3), "nonsense")
    with pytest.raises(InvalidInputError, match="n must be"):
        geud([1.0], [1.0], 0.0)
    with pytest.raises(InvalidInputError, match="one volume per"):
        geud([1.0, 2.0], [1.0], 1.0)
    with pytest.raises(InvalidInputError, match="TD50"):
        lkb_ntcp(10.0, 0.0, 0.1)
    with pytest.raises(InvalidInputError, match="clonogens"):
        poisson_tcp(-1.0)
