"""Contours without weights (twinrt.autocontour.classical) on a synthetic thorax with known truth,
the bundled sample patient and the TG-119 phantom (when ../shared/data is present)."""

import numpy as np
import pytest

from twinrt.autocontour import classical_contours
from twinrt.autocontour.classical import body_mask, check_ct
from twinrt.errors import InvalidInputError
from twinrt.geometry import Grid
from twinrt.model import Image


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def thorax(flip_i=False):
    """A 300 x 200 mm elliptic torso on a couch, two lungs joined by a trachea, a spine and a gas bubble.

    Returns the CT image and the true masks. ``flip_i``: the i axis runs towards the patient's right.
    """
    shape = (40, 64, 96)  # (k, j, i), 4 mm in plane, 5 mm slices
    sp = (4.0, 4.0, 5.0)
    direction = np.diag([-1.0, 1.0, 1.0]) if flip_i else np.eye(3)
    origin = (190.0 if flip_i else -190.0, -126.0, -100.0)
    grid = Grid(shape, sp, origin, direction)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    p = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = (x / 150.0) ** 2 + (y / 100.0) ** 2 <= 1.0
    lung_l = ((x - 65.0) / 45.0) ** 2 + ((y + 10.0) / 55.0) ** 2 + ((z - 10.0) / 80.0) ** 2 <= 1.0  # +x: left
    lung_r = ((x + 65.0) / 45.0) ** 2 + ((y + 10.0) / 55.0) ** 2 + ((z - 10.0) / 80.0) ** 2 <= 1.0
    trachea = (x ** 2 + (y + 20.0) ** 2 <= 8.0 ** 2) & (z > 20.0)
    carina = (np.abs(x) <= 65.0) & ((y + 20.0) ** 2 + (z - 20.0) ** 2 <= 6.0 ** 2)
    spine = (x ** 2 + (y - 65.0) ** 2 <= 14.0 ** 2)
    gas = (x - 30.0) ** 2 + (y + 70.0) ** 2 + (z + 80.0) ** 2 <= 10.0 ** 2
    couch = (y > 108.0) & (y < 118.0) & (np.abs(x) < 180.0)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[couch] = 200.0
    hu[body & (lung_l | lung_r)] = -820.0
    hu[body & (trachea | carina)] = -990.0
    hu[body & spine] = 700.0
    hu[body & gas] = -950.0
    rng = np.random.default_rng(0)
    hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
    truth = {"External": body, "Lung_L": lung_l & body, "Lung_R": lung_r & body, "Bones": spine & body,
             "AirCavity": gas, "couch": couch}
    return Image(hu.astype(np.int16), grid), truth


@pytest.mark.parametrize("flip_i", [False, True])
def test_thorax_structures_match_the_truth(flip_i):
    ct, truth = thorax(flip_i)
    out = {s.name: s for s in classical_contours(ct)}
    assert set(out) == {"External", "Lung_L", "Lung_R", "Bones", "AirCavity"}
    assert dice(out["External"].mask, truth["External"]) > 0.97
    assert not (out["External"].mask & truth["couch"]).any()  # the couch is not patient
    # Lungs: left is the patient's left (+x in LPS) whichever way the i axis runs.
    assert dice(out["Lung_L"].mask, truth["Lung_L"]) > 0.9
    assert dice(out["Lung_R"].mask, truth["Lung_R"]) > 0.9
    assert dice(out["Lung_L"].mask, truth["Lung_R"]) < 0.05
    assert dice(out["Bones"].mask, truth["Bones"]) > 0.85
    # The gas bubble is an air cavity, not lung; the trachea above the lungs is not lung either.
    assert (out["AirCavity"].mask & truth["AirCavity"]).sum() >= 0.8 * truth["AirCavity"].sum()
    assert not (out["Lung_L"].mask & truth["AirCavity"]).any()
    assert all(s.grid == ct.grid for s in out.values())
    assert out["External"].type.value == "EXTERNAL" and out["Lung_L"].type.value == "ORGAN"


def test_groups_select_what_is_made_and_empty_ones_are_left_out():
    ct, truth = thorax()
    names = [s.name for s in classical_contours(ct, groups=["bones"])]
    assert names == ["Bones"]
    # No lungs in a head-sized water cylinder: nothing is returned for them.
    grid = Grid((8, 40, 40), (4.0, 4.0, 4.0), (-78.0, -78.0, -14.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    p = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    water = np.where(p[..., 0] ** 2 + p[..., 1] ** 2 < 60.0 ** 2, 0, -1000).astype(np.int16)
    assert [s.name for s in classical_contours(Image(water, grid), groups=["body", "lungs"])] == ["External"]
    with pytest.raises(InvalidInputError, match="Unknown contour group"):
        classical_contours(ct, groups=["heart"])


def test_body_mask_fills_internal_air_and_drops_noise():
    ct, truth = thorax()
    hu = np.asarray(ct.array).copy()
    hu[0, 2, 2] = 300  # an isolated bright voxel outside the patient
    m = body_mask(hu, ct.grid.spacing_mm)
    assert not m[0, 2, 2]
    assert m[truth["Lung_L"]].all()  # lungs are inside the outline


@pytest.mark.parametrize("make, match", [
    (lambda a: a.astype(np.float32) / 1000.0 + 1.0, "not a CT in Hounsfield"),   # a normalised image
    (lambda a: a[:2], "too small"),
    (lambda a: np.where(a == a.flat[0], np.nan, a.astype(np.float32)), "NaN"),
])
def test_bad_ct_is_refused_with_a_message(make, match):
    ct, _ = thorax()
    arr = make(np.asarray(ct.array))
    grid = Grid(arr.shape, ct.grid.spacing_mm, ct.grid.origin_mm)
    with pytest.raises(InvalidInputError, match=match):
        check_ct(Image(arr, grid))


def test_sample_patient_body_and_bones():
    from twinrt.sample import load_sample_case

    case = load_sample_case()
    out = {s.name: s for s in classical_contours(case.ct)}
    assert "External" in out and "Bones" in out
    body = out["External"].mask
    # Every organ contoured in the sample lies inside the outline (>= 99 % of its voxels).
    for s in case.structures:
        m = s.on_grid(case.ct.grid)
        if m.any() and not s.name.upper().startswith("PTV"):
            assert (m & body).sum() >= 0.99 * m.sum(), s.name
    mandible = next((s for s in case.structures if s.name.lower() == "mandible"), None)
    if mandible is not None:
        m = mandible.on_grid(case.ct.grid)
        assert (m & out["Bones"].mask).sum() >= 0.8 * m.sum()  # measured 0.98


def test_tg119_phantom_body():
    from twinrt.data import load_tg119, shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("../shared/data not found (set TWINRT_SHARED_DATA): TG-119 phantom unavailable")
    case = load_tg119()
    out = {s.name: s for s in classical_contours(case.ct, groups=["body", "lungs"])}
    body = out["External"].mask
    ext = next((s for s in case.structures if s.type.value == "EXTERNAL"), None)
    if ext is not None:
        assert dice(body, ext.on_grid(case.ct.grid)) > 0.95
    else:
        assert body.sum() > 0
    assert "Lung_L" not in out


def test_merge_keeps_the_users_structures_unless_asked():
    from twinrt.autocontour import merge_actions, merge_structures
    from twinrt.model import Structure, StructureType

    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0))
    user = [Structure("BODY", np.ones((2, 2, 2), bool), grid, (1, 1, 1), StructureType.EXTERNAL),
            Structure("external", np.zeros((2, 2, 2), bool) | np.eye(2, dtype=bool)[None], grid, (1, 1, 1),
                      StructureType.EXTERNAL)]
    new = [Structure("External", np.ones((2, 2, 2), bool), grid, (2, 2, 2), StructureType.EXTERNAL),
           Structure("Bones", np.ones((2, 2, 2), bool), grid, (3, 3, 3), StructureType.OTHER)]
    assert merge_actions(["external"], ["External", "Bones"]) == {"External": "keep", "Bones": "add"}
    merged, actions = merge_structures(user, new)
    assert [s.name for s in merged] == ["BODY", "external", "Bones"] and merged[1] is user[1]
    merged, actions = merge_structures(user, new, replace=True)
    assert actions["External"] == "replace" and [s.name for s in merged] == ["BODY", "External", "Bones"]
    assert merged[1] is new[0] and user[1].name == "external"


def test_cli_contour_classical_writes_an_rtstruct(tmp_path):
    from twinrt.cli import main
    from twinrt.dicom.folder import export_case, import_case
    from twinrt.model import Case

    ct, truth = thorax()
    src, out = tmp_path / "in", tmp_path / "out"
    export_case(Case("THORAX", ct, [], {}, [], {"patient_name": "Thorax^Synthetic"}), src)
    assert main(["contour", "classical", str(src), "--out", str(out), "--groups", "body", "lungs"]) == 0
    back = {s.name: s for s in import_case(out).structures}
    assert set(back) == {"External", "Lung_L", "Lung_R"}
    assert dice(back["Lung_L"].mask, truth["Lung_L"]) > 0.85
    assert main(["contour", "classical", str(src), "--out", str(tmp_path / "bad"), "--groups", "heart"]) == 2
    assert not (tmp_path / "bad").exists()


def test_stomach_gas_is_not_a_lung_and_padding_is_air():
    """Review findings: a 200+ cc gas pocket once became 'Lung_L'; -3024 HU padding was refused."""
    ct, truth = thorax()
    grid = ct.grid
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    p = grid.index_to_lps(np.stack([i, j, k], -1).astype(float))
    # Below the lungs (which end at z = -70 mm), separate from them: its own air component.
    stomach = ((p[..., 0] - 40.0) / 70.0) ** 2 + ((p[..., 1] + 30.0) / 50.0) ** 2 + ((p[..., 2] + 88.0) / 12.0) ** 2 <= 1
    hu = np.asarray(ct.array).copy()
    hu[stomach & truth["External"]] = -980
    hu[:, :2, :] = -3024  # out-of-scan padding rows
    gas_cc = float((stomach & truth["External"]).sum()) * grid.voxel_volume_cc
    assert gas_cc > 150.0  # large enough to pass the lung volume threshold on its own
    out = {s.name: s for s in classical_contours(Image(hu, grid))}
    assert dice(out["Lung_L"].mask, truth["Lung_L"]) > 0.9 and dice(out["Lung_R"].mask, truth["Lung_R"]) > 0.9
    assert not (out["Lung_L"].mask & stomach).any() and not (out["Lung_R"].mask & stomach).any()
    assert (out["AirCavity"].mask & stomach).sum() > 0.8 * (stomach & truth["External"]).sum()


def test_bones_reach_the_first_and_last_slices():
    ct, truth = thorax()
    bones = next(s for s in classical_contours(ct, groups=["bones"])).mask
    for k in (0, ct.grid.shape[0] - 1):
        assert bones[k].sum() == truth["Bones"][k].sum() > 0
