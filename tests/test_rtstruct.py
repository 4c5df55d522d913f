"""RTSTRUCT export/import (twinrt.dicom.rtstruct): round trips, dciodvfy validity, bad input."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest

from dicom_validate import dciodvfy_errors
from twinrt.data import load_openkbp, openkbp_patients, shared_data_dir
from twinrt.dicom.common import CT_IMAGE_STORAGE, CtReference, DicomContext, base_dataset, new_uid, save_dataset
from twinrt.dicom.rtstruct import read_rtstruct, write_rtstruct
from twinrt.errors import DicomImportError, GeometryError, StructureError
from twinrt.geometry import Grid
from twinrt.model import Image, Structure, StructureType


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def ct_reference(n_slices: int) -> CtReference:
    # The CT writer lives elsewhere; a reference with fresh UIDs is all an RTSTRUCT needs.
    return CtReference(new_uid(), [new_uid() for _ in range(n_slices)])


def context() -> DicomContext:
    return DicomContext("TWINRT-TEST", patient_name="Test^Phantom")


@pytest.fixture
def phantom():
    """A small CT with a ring target (hole), a two-island organ, a body and an empty structure."""
    grid = Grid((12, 30, 34), (2.0, 2.5, 3.0), (-40.0, -30.0, 10.0), np.diag([1.0, -1.0, -1.0]))
    ct = Image(np.zeros(grid.shape, np.int16), grid)
    ring = np.zeros(grid.shape, bool)
    ring[3:9, 5:20, 5:20] = True
    ring[3:9, 9:15, 9:15] = False
    islands = np.zeros(grid.shape, bool)
    islands[2:6, 22:27, 3:8] = True
    islands[2:6, 22:27, 24:30] = True
    body = np.zeros(grid.shape, bool)
    body[:, 1:29, 1:33] = True
    structures = [
        Structure("PTV_ring", ring, grid, (255, 0, 0), StructureType.TARGET),
        Structure("Parotids", islands, grid, (0, 128, 255), StructureType.ORGAN),
        Structure("BODY", body, grid, (10, 200, 10), StructureType.EXTERNAL),
        Structure("Marker", np.zeros(grid.shape, bool), grid, (1, 2, 3), StructureType.OTHER),
    ]
    return ct, structures


def test_round_trip_is_exact_with_holes_islands_and_types(phantom, tmp_path):
    ct, structures = phantom
    ref, ctx = ct_reference(ct.grid.shape[0]), context()
    path = tmp_path / "rs.dcm"
    uid = write_rtstruct(structures, ref, ctx, path)
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == uid and ds.Modality == "RTSTRUCT"
    back = read_rtstruct(path, ct, ref, ctx.frame_of_reference_uid)
    assert [s.name for s in back] == [s.name for s in structures]
    for a, b in zip(structures, back):
        assert np.array_equal(a.mask, b.mask), a.name
        assert b.color == a.color and b.type == a.type and b.grid == ct.grid
    assert back[3].is_empty  # the documented choice: empty ROI written without contours, read empty


def test_contours_reference_their_ct_slice(phantom, tmp_path):
    ct, structures = phantom
    ref = ct_reference(ct.grid.shape[0])
    path = tmp_path / "rs.dcm"
    write_rtstruct(structures[:1], ref, context(), path)
    ds = pydicom.dcmread(path)
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ref.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == ref.sop_instance_uids
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "PTV"
    for contour in ds.ROIContourSequence[0].ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        pts = np.asarray(contour.ContourData, float).reshape(-1, 3)
        assert len(pts) == contour.NumberOfContourPoints
        k = int(round(ct.grid.lps_to_index(pts)[0, 2]))
        assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == ref.sop_instance_uids[k]
        assert contour.ContourImageSequence[0].ReferencedSOPClassUID == CT_IMAGE_STORAGE


def test_written_rtstruct_passes_dciodvfy(phantom, tmp_path):
    ct, structures = phantom
    path = tmp_path / "rs.dcm"
    write_rtstruct(structures, ct_reference(ct.grid.shape[0]), context(), path)
    errors = dciodvfy_errors(path)
    assert errors == [], "\n".join(errors)


def test_structures_not_on_the_ct_grid_are_refused(phantom, tmp_path):
    ct, structures = phantom
    with pytest.raises(GeometryError, match="resample"):
        write_rtstruct(structures, ct_reference(ct.grid.shape[0] + 1), context(), tmp_path / "rs.dcm")
    assert not (tmp_path / "rs.dcm").exists()


def test_rtstruct_of_another_ct_series_is_refused(phantom, tmp_path):
    ct, structures = phantom
    path = tmp_path / "other.dcm"
    write_rtstruct(structures, ct_reference(ct.grid.shape[0]), context(), path)
    with pytest.raises(DicomImportError, match="load the matching CT") as info:
        read_rtstruct(path, ct, ct_reference(ct.grid.shape[0]))
    assert info.value.path == path and str(path) in str(info.value)


def test_rtstruct_of_another_frame_of_reference_is_refused(phantom, tmp_path):
    ct, structures = phantom
    path = tmp_path / "rs.dcm"
    ref = ct_reference(ct.grid.shape[0])
    write_rtstruct(structures, ref, context(), path)
    with pytest.raises(DicomImportError, match="frame of reference"):
        read_rtstruct(path, ct, ref, frame_of_reference_uid=new_uid())


def test_non_rtstruct_file_is_refused(tmp_path):
    ctx = context()
    path = tmp_path / "ct.dcm"
    save_dataset(base_dataset(CT_IMAGE_STORAGE, "CT", ctx, new_uid(), 1, "CT"), path)
    ct = Image(np.zeros((2, 4, 4), np.int16), Grid((2, 4, 4), (1.0, 1.0, 1.0)))
    with pytest.raises(DicomImportError, match="is not an RTSTRUCT file") as info:
        read_rtstruct(path, ct)
    assert info.value.path == path
    text = tmp_path / "notes.dcm"
    text.write_text("not dicom at all")
    with pytest.raises(DicomImportError, match="notes.dcm"):
        read_rtstruct(text, ct)


def test_structure_outside_the_image_names_it(phantom, tmp_path):
    ct, structures = phantom
    path = tmp_path / "rs.dcm"
    write_rtstruct(structures[:2], ct_reference(ct.grid.shape[0]), context(), path)
    # Load it on a CT of the same shape moved 500 mm away: the contours fall outside that image.
    g = ct.grid
    far = Grid(g.shape, g.spacing_mm, (g.origin_mm[0] + 500.0, g.origin_mm[1], g.origin_mm[2]), g.direction)
    with pytest.raises(StructureError, match="PTV_ring") as info:
        read_rtstruct(path, Image(ct.array, far))
    assert info.value.structure == "PTV_ring"


def openkbp_validation_patients():
    if shared_data_dir() is None:
        return []
    return openkbp_patients("validation")[:2]


@pytest.mark.skipif(shared_data_dir() is None, reason="shared data folder (../shared/data) not found; "
                    "set TWINRT_SHARED_DATA to run the OpenKBP RTSTRUCT round trip")
@pytest.mark.parametrize("patient", openkbp_validation_patients(), ids=lambda p: p.stem)
def test_openkbp_structures_round_trip(patient, tmp_path):
    case = load_openkbp(patient)
    ref, ctx = ct_reference(case.ct.grid.shape[0]), DicomContext.from_case(case)
    path = tmp_path / "rs.dcm"
    t0 = time.perf_counter()
    write_rtstruct(case.structures, ref, ctx, path)
    back = read_rtstruct(path, case.ct, ref, ctx.frame_of_reference_uid)
    elapsed = time.perf_counter() - t0
    assert [s.name for s in back] == [s.name for s in case.structures]
    scores = {a.name: dice(a.mask, b.mask) for a, b in zip(case.structures, back)}
    print(f"{patient.stem}: {len(scores)} ROIs, min Dice {min(scores.values()):.6f}, "
          f"write+read {elapsed:.2f} s")
    assert min(scores.values()) >= 0.99, scores
    assert [b.type for b in back] == [a.type for a in case.structures]
    assert dciodvfy_errors(path) == []
