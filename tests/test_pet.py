"""PET in the course (issue 8, "PET when present"): DICOM PET ↔ SUVbw, the fraction's PET through the
timeline and the DICOM course, ``pet_`` radiomics features and the cohort simulator's PET days."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest

from twinrt.dicom.common import DicomContext
from twinrt.dicom.pet import F18_HALF_LIFE_S, read_pet_series, suv_factor, write_pet_series
from twinrt.errors import DicomImportError, InvalidInputError, MissingInputError
from twinrt.geometry import Grid
from twinrt.model import Image, Structure
from twinrt.toxicity.features import PET_BIN_WIDTH_SUV, feature_names, organ_fraction_features


def _pet(shape=(4, 6, 8), value=2.0, spacing=(4.0, 4.0, 3.0)) -> Image:
    arr = np.full(shape, value, dtype=np.float32)
    arr[1:3, 2:4, 2:6] = 3.5  # a hot region
    return Image(arr, Grid(shape, spacing, (-10.0, -12.0, 5.0)), "PT")


def _ctx() -> DicomContext:
    return DicomContext("PET1", "Test^Pet", frame_of_reference_uid="1.2.3.4", study_date="20261120")


def test_pet_series_round_trip_in_suv(tmp_path):
    pet = _pet()
    write_pet_series(pet, _ctx(), tmp_path / "pt", weight_kg=82.0, injected_mbq=300.0, uptake_s=4200.0)
    files = sorted((tmp_path / "pt").glob("PT_*.dcm"))
    assert len(files) == pet.grid.shape[0]
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "PT" and ds.Units == "BQML" and ds.DecayCorrection == "START"
    # The stored values are activity concentrations (Bq/ml), not SUV: 2 SUV ≈ 2 · D_t / W.
    bq_per_suv = 300e6 * 2 ** (-4200.0 / F18_HALF_LIFE_S) / 82000.0
    stored = ds.pixel_array.astype(float) * float(ds.RescaleSlope)
    assert stored[0, 0] == pytest.approx(2.0 * bq_per_suv, rel=1e-3)
    back, ctx = read_pet_series(tmp_path / "pt")
    assert back.modality == "PT" and back.grid.is_same(pet.grid)
    assert np.allclose(back.array, pet.array, rtol=1e-3, atol=1e-4)
    assert ctx.patient_id == "PET1" and ctx.frame_of_reference_uid == "1.2.3.4"


def _slice(tmp_path):
    write_pet_series(_pet(), _ctx(), tmp_path / "pt", weight_kg=70.0, injected_mbq=370.0, uptake_s=3600.0)
    path = sorted((tmp_path / "pt").glob("PT_*.dcm"))[0]
    return path, pydicom.dcmread(path)


def test_suv_factor_by_hand(tmp_path):
    path, ds = _slice(tmp_path)
    # SUVbw = A · W / (D · 2^(−Δt/T½)), W in g: 70 kg, 370 MBq, 1 h of F-18 decay.
    expected = 70000.0 / (370e6 * 2 ** (-3600.0 / F18_HALF_LIFE_S))
    assert suv_factor(ds, path) == pytest.approx(expected, rel=1e-9)
    ds.DecayCorrection = "ADMIN"  # already decay-corrected to the injection: no decay of the dose
    assert suv_factor(ds, path) == pytest.approx(70000.0 / 370e6, rel=1e-9)
    ds.Units = "GML"  # already SUVbw
    assert suv_factor(ds, path) == 1.0
    # Only the start time (no date-time), injection before midnight and scan after: 1 h across midnight.
    _, ds2 = _slice(tmp_path)
    rp = ds2.RadiopharmaceuticalInformationSequence[0]
    del rp.RadiopharmaceuticalStartDateTime
    rp.RadiopharmaceuticalStartTime, ds2.SeriesTime = "233000", "003000"
    assert suv_factor(ds2, path) == pytest.approx(expected, rel=1e-9)
    # QIBA: the earlier of series and acquisition time (a rewritten, later SeriesTime is not used).
    _, ds3 = _slice(tmp_path)
    ds3.SeriesTime = "130000"  # an hour after the acquisition (12:00)
    assert suv_factor(ds3, path) == pytest.approx(expected, rel=1e-9)


def test_attenuation_corrected_series_is_chosen(tmp_path):
    """An export with the corrected and the uncorrected reconstruction: the corrected one is read."""
    pet = _pet()
    write_pet_series(pet, _ctx(), tmp_path / "pt", series_number=2)
    nac = Image(pet.array * 0.3, pet.grid, "PT")
    write_pet_series(nac, _ctx(), tmp_path / "nac", series_number=3, series_description="NAC")
    for p in (tmp_path / "nac").glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.CorrectedImage = ["DECY"]
        ds.save_as(tmp_path / "pt" / f"NAC_{p.name}")
    back, _ = read_pet_series(tmp_path / "pt")
    assert np.allclose(back.array, pet.array, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("change, words", [
    (lambda ds: setattr(ds, "Units", "CNTS"), "Units"),
    (lambda ds: delattr(ds, "PatientWeight"), "PatientWeight"),
    (lambda ds: setattr(ds, "DecayCorrection", "NONE"), "DecayCorrection"),
    (lambda ds: setattr(ds, "CorrectedImage", ["DECY"]), "attenuation"),
    (lambda ds: delattr(ds, "CorrectedImage"), "attenuation"),
    (lambda ds: setattr(ds, "PatientWeight", "70000"), "kg"),
    (lambda ds: setattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose", "inf"), "TotalDose"),
    (lambda ds: delattr(ds, "RadiopharmaceuticalInformationSequence"), "Radiopharmaceutical"),
    (lambda ds: delattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideTotalDose"), "TotalDose"),
    (lambda ds: delattr(ds.RadiopharmaceuticalInformationSequence[0], "RadionuclideHalfLife"), "HalfLife"),
    (lambda ds: [delattr(ds.RadiopharmaceuticalInformationSequence[0], k) for k in
                 ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime")], "injection time"),
])
def test_suv_refused_without_what_it_needs(tmp_path, change, words):
    path, ds = _slice(tmp_path)
    change(ds)
    with pytest.raises(DicomImportError, match=words):
        suv_factor(ds, path)
    ds.save_as(path)  # and the whole series is refused, naming the file
    with pytest.raises(DicomImportError, match="PT_0001"):
        read_pet_series(tmp_path / "pt")


def test_pet_reader_errors(tmp_path):
    with pytest.raises(MissingInputError):
        read_pet_series(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="No PET"):
        read_pet_series(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="non-negative"):
        write_pet_series(Image(np.full((2, 3, 3), -1.0, np.float32), Grid((2, 3, 3), (1.0, 1.0, 1.0))), _ctx(),
                         tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ features
def test_pet_features_on_the_pet_grid():
    names = feature_names()
    pet_names = [n for n in names if n.startswith("pet_")]
    assert pet_names and "pet_mean" in pet_names and "pet_glcm_contrast" in pet_names
    assert "pet_volume_cc" not in pet_names  # the volume is the CT contour's (ct_volume_cc)
    ct_grid = Grid((8, 12, 16), (2.0, 2.0, 1.5), (-10.0 - 1.0, -12.0 - 1.0, 5.0 - 0.75))
    mask = np.zeros(ct_grid.shape, bool)
    mask[2:6, 4:8, 4:12] = True
    organ = Structure("LeftParotid", mask, ct_grid)
    bed = np.full(ct_grid.shape, 10.0, np.float32)
    ct = Image(np.zeros(ct_grid.shape, np.int16), ct_grid)
    without = organ_fraction_features(bed, mask, ct_grid, ct, organ)
    assert all(math.isnan(without[n]) for n in pet_names)
    assert all(math.isfinite(without[n]) for n in names if n.startswith("ct_"))
    # A PET (coarser grid, same frame) with SUV 3 everywhere: the organ's SUV is 3, uniform.
    flat = Image(np.full((4, 6, 8), 3.0, np.float32), Grid((4, 6, 8), (4.0, 4.0, 3.0), (-10.0, -12.0, 5.0)), "PT")
    with_pet = organ_fraction_features(bed, mask, ct_grid, ct, organ, day_pet=flat)
    assert with_pet["pet_mean"] == pytest.approx(3.0) and with_pet["pet_std"] == pytest.approx(0.0, abs=1e-6)
    assert with_pet["pet_glcm_contrast"] == pytest.approx(0.0) and with_pet["pet_entropy"] == pytest.approx(0.0)
    # Hot spot inside the organ: mean rises, texture appears (bins of PET_BIN_WIDTH_SUV).
    hot = flat.array.copy()
    hot[1:3, 2:4, 2:4] = 3.0 + 8 * PET_BIN_WIDTH_SUV
    f = organ_fraction_features(bed, mask, ct_grid, ct, organ, day_pet=Image(hot, flat.grid, "PT"))
    assert f["pet_mean"] > 3.0 and f["pet_glcm_contrast"] > 0 and f["pet_entropy"] > 0
    assert f["bed_mean"] == with_pet["bed_mean"] and f["ct_mean"] == with_pet["ct_mean"]
    # No contour of the organ that day: no PET features either.
    nod = organ_fraction_features(bed, mask, ct_grid, None, None, day_pet=flat)
    assert all(math.isnan(nod[n]) for n in pet_names)


def test_fraction_refuses_a_bad_pet():
    from twinrt.twin.timeline import Fraction

    ct = Image(np.zeros((2, 3, 3), np.int16), Grid((2, 3, 3), (1.0, 1.0, 1.0)))
    with pytest.raises(InvalidInputError, match="PET"):
        Fraction(1, "2026-11-02", ct, pet=np.zeros((2, 3, 3)))
    with pytest.raises(InvalidInputError, match="NaN"):  # the Image itself refuses it
        Image(np.full((2, 3, 3), np.nan, np.float32), Grid((2, 3, 3), (1.0, 1.0, 1.0)), "PT")


# ------------------------------------------------------------------------------------------ course
@pytest.fixture(scope="module")
def pet_patient():
    """A prepared sample patient simulated over 3 fractions with PET on fractions 1 and 3."""
    from twinrt.sample import load_sample_case
    from twinrt.toxicity.cohort import ORGAN_ENDPOINTS, prepare_case, simulate_patient

    case = prepare_case(load_sample_case(), list(ORGAN_ENDPOINTS))
    trajs, hidden = simulate_patient(case, "petp", seed=21, n_fractions=3, organs=["LeftParotid"],
                                     pet_fractions=[1, 3])
    return case, trajs, hidden


def test_cohort_pet_days_give_pet_features(pet_patient):
    case, trajs, _ = pet_patient
    t = trajs[0]
    names = t.feature_names
    mean = names.index("pet_mean")
    assert np.isfinite(t.features[[0, 2], mean]).all() and np.isnan(t.features[1, mean])
    # Baseline change: 0 on the first PET day, NaN where there is no PET.
    d = names.index("d_pet_mean")
    assert t.features[0, d] == pytest.approx(0.0) and np.isnan(t.features[1, d])
    # The parotid's simulated baseline SUV is 1.6 (blurred at the edges; inflammation adds a little).
    assert 0.9 < t.features[0, mean] < 2.2
    assert t.metadata["pet_fractions"] == [1, 3]


def test_sensitive_organs_take_up_more_fdg():
    """A very sensitive patient's parotid takes up more FDG by the last PET than an insensitive one's."""
    from twinrt.sample import load_sample_case
    from twinrt.toxicity.cohort import ORGAN_ENDPOINTS, ToxicityTruth, prepare_case, simulate_patient

    case = prepare_case(load_sample_case(), list(ORGAN_ENDPOINTS))
    hot = ToxicityTruth(sensitivity_log_sd=1e-6, suv_per_100gy=40.0, pet_noise_sd=0.0)
    cold = ToxicityTruth(sensitivity_log_sd=1e-6, suv_per_100gy=0.0, pet_noise_sd=0.0)
    a, _ = simulate_patient(case, "hot", seed=4, n_fractions=2, truth=hot, organs=["LeftParotid"], pet_fractions=[2])
    b, _ = simulate_patient(case, "cold", seed=4, n_fractions=2, truth=cold, organs=["LeftParotid"], pet_fractions=[2])
    i = a[0].feature_names.index("pet_mean")
    # Before fraction 2 the gland has ~1 fraction of BED (≈ 1–2.5 Gy mean): 40 SUV/100 Gy → +0.2 SUV or more.
    assert a[0].features[1, i] - b[0].features[1, i] > 0.1
    with pytest.raises(InvalidInputError, match="PET fractions"):
        simulate_patient(case, "x", seed=4, n_fractions=2, organs=["LeftParotid"], pet_fractions=[5])


def test_pet_through_timeline_and_dicom_course(tmp_path):
    from twinrt.twin.course_dicom import export_course, import_course
    from twinrt.twin.simulator import CourseSettings, CourseSimulator, simulate_pet
    from twinrt.twin.timeline import CaseTimeline
    from tests.twin_cases import cropped_sample

    case = cropped_sample()
    sim = CourseSimulator(case, "reference", CourseSettings(n_fractions=3, seed=2))
    day = sim.fraction(1).fraction
    day.pet = simulate_pet(day.image, day.structures, {"LeftParotid": 2.5}, np.random.default_rng(0))
    assert not day.pet.grid.is_same(day.image.grid)  # its own, coarser grid
    # Timeline folder: the PET comes back bit for bit.
    tl = sim.timeline()
    from twinrt.twin.twin import DigitalTwin, TwinSettings

    twin = DigitalTwin(tl, TwinSettings(goal_set=None, calibrate=False))
    twin.add_fraction(day)
    tl.save(tmp_path / "tl")
    back = CaseTimeline.load(tmp_path / "tl")
    assert back.fractions[0].pet is not None and back.fractions[0].pet.grid.is_same(day.pet.grid)
    assert np.array_equal(back.fractions[0].pet.array, day.pet.array)
    # DICOM course: the PET series is written into the fraction folder and read back as SUV.
    day2 = sim.fraction(2).fraction
    export_course(tl, tmp_path / "course", [day, day2])
    assert sorted((tmp_path / "course" / "fraction_001").glob("PT_*.dcm"))
    assert not sorted((tmp_path / "course" / "fraction_002").glob("PT_*.dcm"))
    _, fractions = import_course(tmp_path / "course")
    assert fractions[1].pet is None
    got = fractions[0].pet
    assert got.grid.is_same(day.pet.grid)
    assert np.allclose(got.array, day.pet.array, rtol=1e-3, atol=1e-3 * float(day.pet.array.max()))
    # A PET of another frame of reference in a fraction folder is refused, naming the folder.
    folder = tmp_path / "course" / "fraction_001"
    for p in folder.glob("PT_*.dcm"):
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = "1.2.999"
        ds.save_as(p)
    with pytest.raises(DicomImportError, match="fraction_001"):
        import_course(tmp_path / "course")
