"""RTDOSE export/import (twinrt.dicom.rtdose): precision, orientation, frame order, validity, errors."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir
from twinrt.dicom.common import DicomContext
from twinrt.dicom.ct import write_ct_series
from twinrt.dicom.rtdose import MAX_PIXEL, read_rtdose, write_rtdose
from twinrt.errors import DicomImportError, DoseError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Dose, Image

SHAPE = (20, 24, 28)
PLAN_UID = "1.2.826.0.1.3680043.8.498.1"


def _direction(i_axis, j_axis, handed: int = 1) -> np.ndarray:
    i_axis, j_axis = np.asarray(i_axis, float), np.asarray(j_axis, float)
    return np.column_stack([i_axis, j_axis, handed * np.cross(i_axis, j_axis)])


def make_dose(direction: np.ndarray = np.eye(3), seed: int = 0) -> Dose:
    """A smooth 0-70 Gy blob plus noise, exactly zero in one corner."""
    grid = Grid(SHAPE, (2.5, 2.0, 3.0), (-30.0, -20.5, 10.0), direction)
    k, j, i = np.indices(SHAPE, dtype=float)
    blob = 70.0 * np.exp(-((k - 10) ** 2 / 40 + (j - 12) ** 2 / 50 + (i - 14) ** 2 / 60))
    noise = np.random.default_rng(seed).random(SHAPE) * 0.01
    arr = (blob + noise).astype(np.float32)
    arr[:3, :3, :3] = 0.0
    return Dose(arr, grid, name="predicted", dose_type="PHYSICAL", summation="PLAN", source="model x sha256 abc")


@pytest.fixture
def ctx() -> DicomContext:
    return DicomContext("TWINRT-RD-1", "Phantom^Dose")


def _max_error_pct(a: Dose, b: Dose) -> float:
    return float(np.abs(a.array.astype(np.float64) - b.array).max() / a.array.max() * 100)


@pytest.mark.parametrize("direction", [np.eye(3), _direction((-1, 0, 0), (0, 1, 0)),
                                       _direction((0, 1, 0), (-1, 0, 0)), _direction((0, 1, 0), (0, 0, -1))],
                         ids=["identity", "FFS", "rotated", "sagittal"])
def test_round_trip(tmp_path, ctx, direction):
    dose = make_dose(direction)
    uid = write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    back = read_rtdose(tmp_path / "rd.dcm")
    assert back.grid == dose.grid
    # 16-bit pixels: at most half a step, max/130000 = 7.7e-4 % of the maximum.
    assert _max_error_pct(dose, back) < 8e-4
    assert back.array[0, 0, 0] == 0.0
    assert (back.name, back.dose_type, back.summation, back.source) == ("predicted", "PHYSICAL", "PLAN",
                                                                      "model x sha256 abc")
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    assert ds.SOPInstanceUID == uid and ds.DoseUnits == "GY" and ds.NumberOfFrames == SHAPE[0]
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    assert int(ds.pixel_array.max()) <= MAX_PIXEL
    assert [float(v) for v in ds.GridFrameOffsetVector][:3] == [0.0, 3.0, 6.0]
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == PLAN_UID


def test_descending_frames_are_reordered(tmp_path, ctx):
    # k against the row x column normal: the writer emits descending offsets (0, -3, -6, ...).
    dose = make_dose(_direction((1, 0, 0), (0, 1, 0), handed=-1))
    write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    offsets = [float(v) for v in pydicom.dcmread(tmp_path / "rd.dcm").GridFrameOffsetVector]
    assert offsets[1] == -3.0
    back = read_rtdose(tmp_path / "rd.dcm")
    assert np.allclose(back.grid.direction, np.eye(3))
    np.testing.assert_allclose(back.array, dose.array[::-1], rtol=0, atol=dose.max_gy / 130000 * 1.01)
    # Same voxel centres: the last input slice is the first output slice.
    assert np.allclose(back.grid.origin_mm, dose.grid.index_to_lps(np.array([0, 0, SHAPE[0] - 1.0])))


def test_absolute_frame_offsets(tmp_path, ctx):
    dose = make_dose()
    write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    z0 = float(ds.ImagePositionPatient[2])
    ds.GridFrameOffsetVector = [z0 + 3.0 * k for k in range(SHAPE[0])]  # "type b": absolute z
    ds.save_as(tmp_path / "rd_b.dcm")
    assert read_rtdose(tmp_path / "rd_b.dcm").grid == dose.grid


def test_openkbp_reference_dose_precision(tmp_path, ctx):
    if shared_data_dir() is None:
        pytest.skip("../shared/data (OpenKBP) is not available; set TWINRT_SHARED_DATA to run this test")
    case = load_openkbp(openkbp_patients("validation")[0])
    dose = case.doses["reference"]
    write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    back = read_rtdose(tmp_path / "rd.dcm")
    err = _max_error_pct(dose, back)
    print(f"OpenKBP {case.patient_id} RTDOSE round trip: max error {err:.2e} % of max ({dose.max_gy:.2f} Gy)")
    assert back.grid == dose.grid
    assert err <= 0.5
    assert err < 8e-4  # 16-bit quantisation bound


def test_rtdose_passes_dciodvfy_with_plan(tmp_path, ctx):
    write_rtdose(make_dose(_direction((-1, 0, 0), (0, 1, 0))), ctx, tmp_path / "rd.dcm", PLAN_UID)
    errors, warnings = dciodvfy_report(tmp_path / "rd.dcm")
    assert errors == [] and warnings == [], errors + warnings


def test_rtdose_without_plan_is_documented_nonconformance(tmp_path, ctx):
    # DICOM requires ReferencedRTPlanSequence for DoseSummationType PLAN: without a plan the only
    # dciodvfy error is that one (export_case always passes a plan to avoid it).
    write_rtdose(make_dose(), ctx, tmp_path / "rd.dcm")
    errors, _ = dciodvfy_report(tmp_path / "rd.dcm")
    assert len(errors) == 1 and "ReferencedRTPlanSequence" in errors[0], errors
    assert read_rtdose(tmp_path / "rd.dcm").summation == "PLAN"


def test_nan_dose_is_refused_and_nothing_written(tmp_path, ctx):
    dose = make_dose()
    dose.array[5, 5, 5] = np.nan  # bypasses the constructor's check, as a buggy stage could
    with pytest.raises(DoseError, match="NaN"):
        write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    assert list(tmp_path.iterdir()) == []


def test_negative_dose_in_file_names_file(tmp_path, ctx):
    write_rtdose(make_dose(), ctx, tmp_path / "rd.dcm", PLAN_UID)
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    ds.DoseGridScaling = "-1e-8"
    ds.save_as(tmp_path / "neg.dcm")
    with pytest.raises(DoseError, match="negative") as err:
        read_rtdose(tmp_path / "neg.dcm")
    assert "neg.dcm" in str(err.value)


def test_signed_negative_pixels(tmp_path, ctx):
    write_rtdose(make_dose(), ctx, tmp_path / "rd.dcm", PLAN_UID)
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    arr = ds.pixel_array.astype(np.int32)
    arr[0, 0, 0] = -5
    ds.PixelRepresentation = 1
    ds.PixelData = arr.astype("<i2").tobytes()
    ds.save_as(tmp_path / "signed.dcm")
    with pytest.raises(DoseError) as err:
        read_rtdose(tmp_path / "signed.dcm")
    assert "signed.dcm" in str(err.value)


def test_not_rtdose(tmp_path, ctx):
    grid = Grid((2, 4, 4), (1, 1, 1))
    write_ct_series(Image(np.zeros(grid.shape, np.int16), grid), ctx, tmp_path)
    with pytest.raises(DicomImportError, match="not an RTDOSE") as err:
        read_rtdose(tmp_path / "CT_0001.dcm")
    assert "CT_0001.dcm" in str(err.value)
    (tmp_path / "junk.dcm").write_text("junk")
    with pytest.raises(DicomImportError, match="junk.dcm"):
        read_rtdose(tmp_path / "junk.dcm")
    with pytest.raises(MissingInputError):
        read_rtdose(tmp_path / "missing.dcm")


def test_relative_dose_refused(tmp_path, ctx):
    write_rtdose(make_dose(), ctx, tmp_path / "rd.dcm", PLAN_UID)
    ds = pydicom.dcmread(tmp_path / "rd.dcm")
    ds.DoseUnits = "RELATIVE"
    ds.save_as(tmp_path / "rel.dcm")
    with pytest.raises(DicomImportError, match="rel.dcm"):
        read_rtdose(tmp_path / "rel.dcm")


def test_zero_dose(tmp_path, ctx):
    dose = Dose(np.zeros(SHAPE, np.float32), make_dose().grid)
    write_rtdose(dose, ctx, tmp_path / "rd.dcm", PLAN_UID)
    assert read_rtdose(tmp_path / "rd.dcm").max_gy == 0.0
