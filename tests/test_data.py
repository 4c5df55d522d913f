"""Loaders for ../shared/data (skipped when it is absent)."""

import numpy as np
import pytest

from twinrt.data import load_openkbp, load_tg119, openkbp_patients, shared_data_dir
from twinrt.errors import InvalidInputError, MissingInputError

needs_shared = pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is absent (fresh clone)")


@needs_shared
def test_openkbp_orientation_matches_anatomy():
    case = load_openkbp(openkbp_patients("validation")[0])
    g = case.ct.grid

    def centroid(name):
        idx = np.argwhere(case.structure(name).mask).mean(axis=0)
        return g.index_to_lps(idx[::-1])

    # LPS: +x patient left, +y posterior, +z superior.
    assert centroid("LeftParotid")[0] > centroid("RightParotid")[0]
    assert centroid("Mandible")[1] < centroid("SpinalCord")[1]
    assert centroid("Brainstem")[2] > centroid("SpinalCord")[2]
    assert case.ct.array.min() >= -1000
    assert case.doses["reference"].max_gy > 60
    assert {p.target for p in case.prescriptions} <= {"PTV70", "PTV63", "PTV56"}


@needs_shared
def test_tg119_geometry():
    case = load_tg119()
    assert case.ct.grid.shape == (129, 167, 167)
    assert case.ct.grid.spacing_mm == (3.0, 3.0, 2.5)
    assert case.structure("OuterTarget").type.value == "TARGET"
    assert case.structure("BODY").type.value == "EXTERNAL"


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        load_openkbp(tmp_path / "pt_1.npz")
    bad = tmp_path / "pt_2.npz"
    np.savez(bad, ct=np.zeros((2, 2, 2)))
    with pytest.raises(InvalidInputError, match="lacks keys"):
        load_openkbp(bad)
    junk = tmp_path / "pt_3.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError):
        load_openkbp(junk)
