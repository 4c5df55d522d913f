"""CT series export/import (twinrt.dicom.ct): exact round trips, dciodvfy validity, refused inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.dicom.common import DicomContext, new_uid
from twinrt.dicom.ct import guess_patient_position, read_ct_series, write_ct_series
from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Image

SHAPE = (20, 24, 28)  # (k, j, i): small enough for milliseconds, anisotropic to catch axis swaps


def _direction(i_axis, j_axis) -> np.ndarray:
    i_axis, j_axis = np.asarray(i_axis, float), np.asarray(j_axis, float)
    return np.column_stack([i_axis, j_axis, np.cross(i_axis, j_axis)])


DIRECTIONS = {
    "HFS identity": np.eye(3),
    "FFS": _direction((-1, 0, 0), (0, 1, 0)),
    "rotated 90 deg": _direction((0, 1, 0), (-1, 0, 0)),
    "sagittal": _direction((0, 1, 0), (0, 0, -1)),
    "oblique": _direction((np.cos(0.3), np.sin(0.3), 0), (-np.sin(0.3), np.cos(0.3), 0)),
}


def make_ct(direction: np.ndarray = np.eye(3), seed: int = 0) -> Image:
    """A random int16 HU image (air to bone) on a 20x24x28 grid."""
    grid = Grid(SHAPE, (1.25, 0.9765625, 2.5), (-12.5, -30.0, 41.25), direction)
    hu = np.random.default_rng(seed).integers(-1024, 3000, SHAPE).astype(np.int16)
    return Image(hu, grid, "CT")


@pytest.fixture
def ctx() -> DicomContext:
    return DicomContext("TWINRT-CT-1", "Phantom^CT", study_date="20240102", study_time="101500",
                        patient_birth_date="19700101", patient_sex="F")


@pytest.fixture
def ct_folder(tmp_path, ctx) -> Path:
    folder = tmp_path / "ct"
    write_ct_series(make_ct(), ctx, folder)
    return folder


# --------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_round_trip_is_exact(tmp_path, ctx, name):
    image = make_ct(DIRECTIONS[name])
    ref = write_ct_series(image, ctx, tmp_path / "ct")
    back, ref2, ctx2 = read_ct_series(tmp_path / "ct")
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, image.array)
    assert back.grid == image.grid, (back.grid, image.grid)
    assert np.allclose(back.grid.direction, image.grid.direction, atol=1e-9)
    assert np.allclose(back.grid.origin_mm, image.grid.origin_mm, atol=1e-6)
    assert ref2.series_instance_uid == ref.series_instance_uid
    assert ref2.sop_instance_uids == ref.sop_instance_uids
    for field in ("patient_id", "patient_name", "study_instance_uid", "frame_of_reference_uid", "study_date",
                  "study_time", "patient_birth_date", "patient_sex"):
        assert getattr(ctx2, field) == getattr(ctx, field), field


def test_slice_attributes_follow_grid(tmp_path, ctx):
    image = make_ct(DIRECTIONS["FFS"])
    write_ct_series(image, ctx, tmp_path / "ct")
    ds = pydicom.dcmread(tmp_path / "ct" / "CT_0003.dcm")
    pos = image.grid.index_to_lps(np.array([0.0, 0.0, 2.0]))
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], pos)
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, 1, 0]
    assert float(ds.SliceLocation) == pytest.approx(pos @ np.array([0, 0, -1.0]))
    assert [float(v) for v in ds.PixelSpacing] == [0.9765625, 1.25]  # (row spacing = dj, column spacing = di)
    assert ds.PatientPosition == "FFS" and ds.Modality == "CT" and ds.InstanceNumber == 3


def test_patient_position_guess():
    assert guess_patient_position(np.eye(3)) == "HFS"
    assert guess_patient_position(DIRECTIONS["FFS"]) == "FFS"
    assert guess_patient_position(_direction((-1, 0, 0), (0, -1, 0))) == "HFP"
    assert guess_patient_position(DIRECTIONS["sagittal"]) == ""


def test_float_hu_uses_rescale(tmp_path, ctx):
    image = make_ct()
    hu = image.array.astype(np.float32) + 0.37
    write_ct_series(Image(hu, image.grid), ctx, tmp_path / "ct")
    back, _, _ = read_ct_series(tmp_path / "ct")
    slope = float(pydicom.dcmread(tmp_path / "ct" / "CT_0001.dcm").RescaleSlope)
    assert back.array.dtype == np.float32
    assert np.abs(back.array - hu).max() <= slope / 2 + 1e-3


def test_uids_are_deterministic(tmp_path, ctx):
    image = make_ct()
    a = write_ct_series(image, ctx, tmp_path / "a")
    b = write_ct_series(image, ctx, tmp_path / "b")
    assert a.series_instance_uid == b.series_instance_uid and a.sop_instance_uids == b.sop_instance_uids
    assert a.sop_instance_uids[3] == new_uid(a.series_instance_uid, 3)
    changed = Image(image.array + np.int16(1), image.grid)
    assert write_ct_series(changed, ctx, tmp_path / "c").series_instance_uid != a.series_instance_uid


def test_single_slice(tmp_path, ctx):
    grid = Grid((1, 8, 9), (1.0, 1.0, 3.0), (0, 0, 0))
    write_ct_series(Image(np.zeros(grid.shape, np.int16), grid), ctx, tmp_path / "ct")
    back, _, _ = read_ct_series(tmp_path / "ct")
    assert back.grid == grid


def test_ct_passes_dciodvfy(ct_folder):
    counts = []
    for name in ("CT_0001.dcm", "CT_0010.dcm", "CT_0020.dcm"):
        errors, warnings = dciodvfy_report(ct_folder / name)
        assert errors == [], errors
        counts.append(len(warnings))
    # Only the empty-Laterality advisory is expected (a CT covers both sides of paired organs).
    assert max(counts) <= 1, counts


# --------------------------------------------------------------------------------------- tolerated input
def test_junk_and_other_modalities_are_ignored(ct_folder, ctx):
    (ct_folder / "README.txt").write_text("not DICOM")
    (ct_folder / "thumbs.db").write_bytes(b"\x00\x01" * 300)
    from twinrt.dicom.rtplan import write_rtplan
    from twinrt.model import Plan

    write_rtplan(Plan("P"), ctx, ct_folder / "RTPLAN.dcm")
    image, ref, _ = read_ct_series(ct_folder)
    np.testing.assert_array_equal(image.array, make_ct().array)
    assert len(ref.sop_instance_uids) == SHAPE[0]


# --------------------------------------------------------------------------------------- refused input
def test_missing_folder(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        read_ct_series(tmp_path / "nope")


def test_folder_without_ct(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(MissingInputError) as err:
        read_ct_series(tmp_path)
    assert str(tmp_path) in str(err.value) and err.value.path == tmp_path


def test_gap_names_neighbour_files(ct_folder):
    (ct_folder / "CT_0010.dcm").unlink()
    with pytest.raises(DicomImportError) as err:
        read_ct_series(ct_folder)
    msg = str(err.value)
    assert "CT_0009.dcm" in msg and "CT_0011.dcm" in msg and "gap" in msg
    assert "5.000 mm" in msg and "2.500 mm" in msg


def test_non_uniform_spacing(ct_folder):
    ds = pydicom.dcmread(ct_folder / "CT_0010.dcm")
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(ct_folder / "CT_0010.dcm")
    with pytest.raises(DicomImportError, match="apart"):
        read_ct_series(ct_folder)


def test_gantry_tilt_tag(ct_folder):
    ds = pydicom.dcmread(ct_folder / "CT_0005.dcm")
    ds.GantryDetectorTilt = 7.5
    ds.save_as(ct_folder / "CT_0005.dcm")
    with pytest.raises(DicomImportError) as err:
        read_ct_series(ct_folder)
    assert "CT_0005.dcm" in str(err.value) and "tilt" in str(err.value)


def test_tilted_positions_without_tag(ct_folder):
    # A tilt of ~11 degrees: each slice moves 0.5 mm along y for 2.5 mm along z.
    for k, path in enumerate(sorted(ct_folder.glob("CT_*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.5 * k
        ds.save_as(path)
    with pytest.raises(DicomImportError, match="tilt") as err:
        read_ct_series(ct_folder)
    assert err.value.path is not None and err.value.path.name.startswith("CT_")


def test_mixed_series(tmp_path, ctx, ct_folder):
    other = write_ct_series(make_ct(seed=1), ctx, tmp_path / "other", series_number=2)
    for p in (tmp_path / "other").glob("*.dcm"):
        shutil.copy(p, ct_folder / f"B_{p.name}")
    with pytest.raises(DicomImportError) as err:
        read_ct_series(ct_folder)
    msg = str(err.value)
    assert other.series_instance_uid in msg and "one series per folder" in msg and "series_instance_uid=" in msg
    image, ref, _ = read_ct_series(ct_folder, series_instance_uid=other.series_instance_uid)
    np.testing.assert_array_equal(image.array, make_ct(seed=1).array)
    with pytest.raises(DicomImportError, match="no CT series"):
        read_ct_series(ct_folder, series_instance_uid="1.2.3")


def test_duplicate_position(ct_folder):
    ds = pydicom.dcmread(ct_folder / "CT_0004.dcm")
    ds.SOPInstanceUID = new_uid()
    ds.save_as(ct_folder / "CT_dup.dcm")
    with pytest.raises(DicomImportError, match="same position") as err:
        read_ct_series(ct_folder)
    assert "CT_0004.dcm" in str(err.value) and "CT_dup.dcm" in str(err.value)


@pytest.mark.parametrize("change, words", [
    (lambda ds: setattr(ds, "PixelSpacing", [1.0, 1.0]), "PixelSpacing"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, -1, 0, 0]), "orientation"),
    (lambda ds: (setattr(ds, "Rows", 12), setattr(ds, "PixelData", b"\0" * (12 * 28 * 2))), "slice size"),
])
def test_differing_slice_geometry(ct_folder, change, words):
    ds = pydicom.dcmread(ct_folder / "CT_0007.dcm")
    change(ds)
    ds.save_as(ct_folder / "CT_0007.dcm")
    with pytest.raises(DicomImportError, match=words) as err:
        read_ct_series(ct_folder)
    assert "CT_0007.dcm" in str(err.value)


def test_unreadable_file(ct_folder):
    data = (ct_folder / "CT_0002.dcm").read_bytes()
    (ct_folder / "CT_0002.dcm").write_bytes(data[:700])  # DICM marker kept, header cut mid-element
    with pytest.raises(DicomImportError) as err:
        read_ct_series(ct_folder)
    assert "CT_0002.dcm" in str(err.value)


def test_failed_write_leaves_nothing(tmp_path, ctx):
    image = make_ct()
    with pytest.raises(InvalidInputError, match="NaN"):  # an Image refuses NaN voxels itself
        Image(np.where(image.array > 2000, np.nan, image.array.astype(np.float32)), image.grid)
    bad = Image(image.array.astype(np.float32), image.grid)
    bad.array[image.array > 2000] = np.nan  # changed after the checks: the writer must still refuse it
    with pytest.raises(InvalidInputError, match="NaN"):
        write_ct_series(bad, ctx, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(InvalidInputError, match="distinct UIDs"):
        write_ct_series(image, ctx, tmp_path / "ct", sop_instance_uids=["1.2.3"] * SHAPE[0])
    assert not (tmp_path / "ct").exists()
