"""Whole-case DICOM folder export/import (twinrt.dicom.folder)."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from dicom_validate import dciodvfy_report
from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir
from twinrt.dicom import export_case, import_case
from twinrt.dicom.common import DicomContext
from twinrt.dicom.rtdose import write_rtdose
from twinrt.errors import DicomImportError, DoseError, InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType

SHAPE = (20, 24, 28)


def _has_rtstruct() -> bool:
    try:
        from twinrt.dicom import rtstruct  # noqa: F401
    except ImportError:
        return False
    return True


needs_rtstruct = pytest.mark.skipif(not _has_rtstruct(), reason="twinrt.dicom.rtstruct has not landed yet")


def make_case(with_structures: bool = True) -> Case:
    """CT, two box structures, a dose on its own (coarser) grid and a skeleton plan."""
    grid = Grid(SHAPE, (2.0, 2.0, 2.5), (-27.0, -23.0, -23.75))
    hu = np.random.default_rng(3).integers(-1000, 1500, SHAPE).astype(np.int16)
    body = np.zeros(SHAPE, bool)
    body[2:18, 3:21, 3:25] = True
    ptv = np.zeros(SHAPE, bool)
    ptv[7:13, 9:15, 10:18] = True
    structures = [Structure("BODY", body, grid, (0, 255, 0), StructureType.EXTERNAL),
                  Structure("PTV70", ptv, grid, (255, 0, 0), StructureType.TARGET)] if with_structures else []
    dgrid = Grid((10, 12, 14), (4.0, 4.0, 5.0), (-26.0, -22.0, -22.5))
    k, j, i = np.indices(dgrid.shape, dtype=float)
    dose = Dose((70 * np.exp(-((k - 5) ** 2 + (j - 6) ** 2 + (i - 7) ** 2) / 30)).astype(np.float32), dgrid,
                name="predicted", source="unit test")
    plan = Plan("AI", [Prescription("PTV70", 70.0, 35)])
    return Case("TWINRT-F-1", Image(hu, grid), structures, {"predicted": dose}, [plan],
                {"patient_name": "Phantom^Folder"})


def _uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_export_import_without_structures(tmp_path):
    case = make_case(with_structures=False)
    files = export_case(case, tmp_path / "out")
    assert len(files["ct"]) == SHAPE[0] and len(files["rtdose"]) == 1 and len(files["rtplan"]) == 1
    assert files["rtstruct"] == []
    assert all(p.is_file() and p.parent == tmp_path / "out" for v in files.values() for p in v)
    back = import_case(tmp_path / "out")
    np.testing.assert_array_equal(back.ct.array, case.ct.array)
    assert back.ct.grid == case.ct.grid
    d, d2 = case.doses["predicted"], back.doses["predicted"]
    assert d2.grid == d.grid and np.abs(d2.array - d.array).max() <= d.max_gy / 130000  # 16-bit quantisation
    assert back.plans[0].prescriptions == case.plans[0].prescriptions
    assert back.prescriptions == case.prescriptions
    assert back.patient_id == case.patient_id and back.metadata["patient_name"] == "Phantom^Folder"
    # The dose references the exported plan, so the dose file conforms.
    rd = pydicom.dcmread(files["rtdose"][0])
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == _uid(files["rtplan"][0])
    assert case.metadata["rtdose_sop_instance_uids"]["predicted"] == rd.SOPInstanceUID


def test_uids_stored_and_reused(tmp_path):
    case = make_case(with_structures=False)
    export_case(case, tmp_path / "a")
    meta = dict(case.metadata)
    for key in ("study_instance_uid", "frame_of_reference_uid", "series_instance_uid", "ct_sop_instance_uids"):
        assert meta[key], key
    export_case(case, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in ("CT_0001.dcm", "RTDOSE_predicted.dcm", "RTPLAN_1_AI.dcm"):
        assert _uid(tmp_path / "a" / name) == _uid(tmp_path / "b" / name)
    # An imported case keeps its CT UIDs on re-export (so an RTSTRUCT made elsewhere still matches).
    back = import_case(tmp_path / "a")
    export_case(back, tmp_path / "c")
    assert _uid(tmp_path / "c" / "CT_0005.dcm") == _uid(tmp_path / "a" / "CT_0005.dcm")
    ds = pydicom.dcmread(tmp_path / "c" / "RTDOSE_predicted.dcm", stop_before_pixels=True)
    assert ds.StudyInstanceUID == meta["study_instance_uid"]
    assert ds.FrameOfReferenceUID == meta["frame_of_reference_uid"]


def test_include_subset(tmp_path):
    files = export_case(make_case(with_structures=False), tmp_path / "out", include=("rtdose", "rtplan"))
    assert set(files) == {"rtdose", "rtplan"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RTDOSE_predicted.dcm", "RTPLAN_1_AI.dcm"]
    with pytest.raises(InvalidInputError, match="Unknown"):
        export_case(make_case(), tmp_path / "x", include=("ct", "seg"))
    assert not (tmp_path / "x").exists()


def test_every_exported_file_passes_dciodvfy(tmp_path):
    case = make_case(with_structures=_has_rtstruct())
    files = export_case(case, tmp_path / "out")
    report = {}
    for kind, paths in files.items():
        for p in paths[:1] + paths[-1:]:
            errors, warnings = dciodvfy_report(p)
            assert errors == [], (p.name, errors)
            report[kind] = len(warnings)
    print("dciodvfy warnings per file type:", report)
    assert report.get("rtdose", 0) == 0 and report.get("rtplan", 0) == 0


def test_failed_export_leaves_no_folder(tmp_path):
    case = make_case(with_structures=False)
    case.doses["predicted"].array[1, 1, 1] = -3.0  # corrupted after construction
    with pytest.raises(DoseError):
        export_case(case, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert "series_instance_uid" not in case.metadata  # metadata only updated on success


def test_failed_export_keeps_previous_folder(tmp_path):
    good = make_case(with_structures=False)
    export_case(good, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    bad = make_case(with_structures=False)
    bad.doses["predicted"].array[0, 0, 0] = np.nan
    with pytest.raises(DoseError):
        export_case(bad, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_refuses_to_replace_unrelated_folder(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(InvalidInputError, match="does not look like a DICOM export"):
        export_case(make_case(with_structures=False), tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_import_missing_and_empty(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        import_case(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(MissingInputError) as err:
        import_case(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_import_ignores_junk(tmp_path):
    export_case(make_case(with_structures=False), tmp_path / "out")
    (tmp_path / "out" / "README.txt").write_text("sample")
    (tmp_path / "out" / "DICOMDIR.bak").write_bytes(b"\x01" * 64)
    assert "predicted" in import_case(tmp_path / "out").doses


def test_import_refuses_dose_of_other_frame(tmp_path):
    case = make_case(with_structures=False)
    export_case(case, tmp_path / "out", include=("ct",))
    other = DicomContext(case.patient_id, frame_of_reference_uid="1.2.826.0.1.3680043.8.498.99")
    write_rtdose(case.doses["predicted"], other, tmp_path / "out" / "RD_other.dcm", "1.2.3")
    with pytest.raises(DicomImportError, match="frame of reference") as err:
        import_case(tmp_path / "out")
    assert "RD_other.dcm" in str(err.value)


def test_import_refuses_other_patient(tmp_path):
    case = make_case(with_structures=False)
    export_case(case, tmp_path / "out", include=("ct",))
    ctx = DicomContext.from_case(case)
    ctx.patient_id = "SOMEONE-ELSE"
    write_rtdose(case.doses["predicted"], ctx, tmp_path / "out" / "RD_x.dcm", "1.2.3")
    with pytest.raises(DicomImportError, match="RD_x.dcm"):
        import_case(tmp_path / "out")


def test_duplicate_dose_names_get_suffix(tmp_path):
    case = make_case(with_structures=False)
    export_case(case, tmp_path / "out")
    shutil.copy(tmp_path / "out" / "RTDOSE_predicted.dcm", tmp_path / "out" / "RTDOSE_copy.dcm")
    assert sorted(import_case(tmp_path / "out").doses) == ["predicted", "predicted_2"]


@needs_rtstruct
def test_structures_round_trip(tmp_path):
    case = make_case()
    files = export_case(case, tmp_path / "out")
    assert len(files["rtstruct"]) == 1
    rp = pydicom.dcmread(files["rtplan"][0])
    assert rp.RTPlanGeometry == "PATIENT"
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == _uid(files["rtstruct"][0])
    back = import_case(tmp_path / "out")
    assert [s.name for s in back.structures] == ["BODY", "PTV70"]
    for s in case.structures:
        np.testing.assert_array_equal(back.structure(s.name).mask, s.mask)


@needs_rtstruct
def test_rtstruct_of_other_series_is_refused(tmp_path):
    case = make_case()
    export_case(case, tmp_path / "a")
    other = make_case()
    other.ct = Image(other.ct.array + np.int16(1), other.ct.grid)  # another CT series (new UIDs)
    export_case(other, tmp_path / "b", include=("ct",))
    shutil.copy(tmp_path / "a" / "RTSTRUCT.dcm", tmp_path / "b" / "RTSTRUCT.dcm")
    with pytest.raises(DicomImportError) as err:
        import_case(tmp_path / "b")
    assert "RTSTRUCT.dcm" in str(err.value)


@needs_rtstruct
def test_two_rtstructs_are_refused(tmp_path):
    export_case(make_case(), tmp_path / "out")
    shutil.copy(tmp_path / "out" / "RTSTRUCT.dcm", tmp_path / "out" / "RTSTRUCT_2.dcm")
    with pytest.raises(DicomImportError, match="RTSTRUCT files"):
        import_case(tmp_path / "out")


def test_openkbp_patient_round_trip(tmp_path):
    if shared_data_dir() is None:
        pytest.skip("../shared/data (OpenKBP) is not available; set TWINRT_SHARED_DATA to run this test")
    case = load_openkbp(openkbp_patients("validation")[0])
    case.plans.append(Plan("TwinRT", list(case.prescriptions)))
    include = ("ct", "rtstruct", "rtdose", "rtplan") if _has_rtstruct() else ("ct", "rtdose", "rtplan")
    files = export_case(case, tmp_path / "out", include=include)
    for kind, paths in files.items():
        for p in paths[:1]:
            errors, _ = dciodvfy_report(p)
            assert errors == [], (kind, errors)
    back = import_case(tmp_path / "out")
    np.testing.assert_array_equal(back.ct.array, case.ct.array)
    assert back.ct.grid == case.ct.grid
    ref, ref2 = case.doses["reference"], back.doses["reference"]
    err = float(np.abs(ref2.array - ref.array).max() / ref.max_gy * 100)
    print(f"OpenKBP {case.patient_id}: CT identical, RTDOSE max error {err:.2e} % of max")
    assert err <= 0.5
    if _has_rtstruct():
        assert {s.name for s in back.structures} == {s.name for s in case.structures}
