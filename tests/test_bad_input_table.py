"""The README's bad-input table (issue 10), core and command-line rows: each row is run here.

Every row names a public entry point, a bad input and the typed error it gets (the CLI: exit status
2 and a one-line ``error:`` message). :data:`ROWS` is the table; :func:`test_readme_lists_every_row`
keeps the README's table and this one the same. The Slicer Logic rows (with the scene compared
before and after) are in ``Testing/Python/TwinRTBadInputTest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest

from tests.fuzz_targets import small_case
from twinrt.errors import TwinRTError
from twinrt.geometry import Grid
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType

ROOT = Path(__file__).resolve().parent.parent
G = Grid((6, 8, 10), (3.0, 3.0, 4.0))


def _cli(*argv: str) -> Callable[[Path], None]:
    """A CLI row: exit status 2 and an ``error:`` line on stderr, nothing else."""
    def run(tmp: Path) -> None:
        import contextlib
        import io

        from twinrt.cli import main

        import logging

        err, debug = io.StringIO(), io.StringIO()
        handler = logging.StreamHandler(debug)
        cli_log = logging.getLogger("twinrt.cli")
        cli_log.addHandler(handler)
        level = cli_log.level
        cli_log.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main([a.replace("{tmp}", str(tmp)) for a in argv])
                except SystemExit as exc:  # argparse refuses a bad option itself
                    code = exc.code
        finally:
            cli_log.removeHandler(handler)
            cli_log.setLevel(level)
        assert code == 2, (code, err.getvalue())
        assert err.getvalue().strip(), "no message"
        refused = debug.getvalue().strip().removeprefix("refused with ") or "usage"
        raise _CliRefused(f"{refused}: {err.getvalue().strip().splitlines()[-1]}")
    return run


class _CliRefused(TwinRTError):
    """Marks a CLI row that ended with exit status 2 and a message (see :func:`_cli`)."""


def _build_cohort(tmp: Path) -> None:
    from tests.fuzz_targets import TARGETS

    TARGETS["cohort_csv"]._build(tmp)


def _export(tmp: Path, other_patient_dose: bool = False, gap: bool = False, no_target: bool = False) -> Path:
    from twinrt.dicom.folder import export_case

    case = small_case()
    if no_target:
        case.structures = [s for s in case.structures if s.type.value != "TARGET"]
    folder = tmp / "case"
    files = export_case(case, folder)
    if other_patient_dose:
        ds = pydicom.dcmread(files["rtdose"][0])
        ds.PatientID = "SOMEONE-ELSE"
        ds.save_as(files["rtdose"][0])
    if gap:
        files["ct"][2].unlink()
    return folder


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:400])
    return path


def _twin_refuses_other_patient(tmp: Path) -> None:
    from tests.twin_cases import cropped_sample
    from twinrt.twin.simulator import CourseSettings, CourseSimulator
    from twinrt.twin.twin import DigitalTwin, TwinSettings

    sim = CourseSimulator(cropped_sample(), "reference", CourseSettings(n_fractions=3, seed=1))
    twin = DigitalTwin(sim.timeline(), TwinSettings(goal_set=None, calibrate=False))
    day = sim.fraction(1).fraction
    day.patient_id = "SOMEONE-ELSE"
    twin.add_fraction(day)


def _toxicity_weights_changed(tmp: Path) -> None:
    from tests.fuzz_targets import TARGETS
    from twinrt.toxicity.model import ToxicityModel

    weights = TARGETS["toxicity_manifest"]._build(tmp).with_suffix(".pt")  # a copy of the shipped model
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    ToxicityModel.load(weights)


def _timeline_damaged(tmp: Path) -> None:
    from twinrt.twin.timeline import CaseTimeline

    CaseTimeline(small_case(), "planned", 35, "2026-01-05").save(tmp / "tl")
    _truncate(tmp / "tl" / "planning.npz")
    CaseTimeline.load(tmp / "tl")


def _audit_edited(tmp: Path) -> None:
    from twinrt.audit import AuditLog

    log = AuditLog()
    log.ai_action("contoured 12 organs")
    log.ai_action("planned")
    path = log.save(tmp / "AUDIT.jsonl")
    path.write_text(path.read_text().replace("12 organs", "13 organs"))
    AuditLog.load(path)


def _pet_without_weight(tmp: Path) -> None:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.pet import read_pet_series, write_pet_series

    case = small_case()
    write_pet_series(Image(np.ones(case.ct.grid.shape, np.float32), case.ct.grid, "PT"),
                     DicomContext.from_case(case), tmp / "pt")
    for p in (tmp / "pt").glob("*.dcm"):
        ds = pydicom.dcmread(p)
        del ds.PatientWeight
        ds.save_as(p)
    read_pet_series(tmp / "pt")


def _features_no_endpoint(tmp: Path) -> None:
    from types import SimpleNamespace

    from twinrt.toxicity.features import trajectories_from_twin

    case = small_case()
    timeline = SimpleNamespace(planning=case, fractions=[], records=[], patient_id="P", n_fractions=35)
    twin = SimpleNamespace(timeline=timeline, grid=case.ct.grid)
    trajectories_from_twin(twin, organs=["BODY"])


def _plan(case: Case) -> None:
    from twinrt.planning.workflow import plan_case

    plan_case(case)


def _target(mask: np.ndarray) -> Structure:
    return Structure("PTV70", mask, G, type=StructureType.TARGET)


CT = Image(np.zeros(G.shape, np.int16), G)
FULL = np.ones(G.shape, bool)

#: (entry point, bad input, the error's class name, the call). The README's table has the same rows.
ROWS: list[tuple[str, str, str, Callable[[Path], object]]] = [
    ("`twinrt run DIR`", "folder does not exist", "MissingInputError (exit 2, stage 'import DICOM')",
     _cli("run", "{tmp}/nope", "--out", "{tmp}/out", "--no-scene")),
    ("`twinrt run DIR`", "folder without a CT series", "MissingInputError (exit 2, stage 'import DICOM')",
     lambda tmp: (tmp.joinpath("empty").mkdir(), _cli("run", "{tmp}/empty", "--out", "{tmp}/out")(tmp))),
    ("`twinrt run DIR`", "an RTDOSE of another patient in the folder", "DicomImportError (exit 2, stage 'import DICOM')",
     lambda tmp: (_export(tmp, other_patient_dose=True), _cli("run", "{tmp}/case", "--out", "{tmp}/out",
                                                              "--no-scene", "--no-plan")(tmp))),
    ("`twinrt run DIR`", "a CT series with a missing slice", "DicomImportError (exit 2, stage 'import DICOM')",
     lambda tmp: (_export(tmp, gap=True), _cli("run", "{tmp}/case", "--out", "{tmp}/out", "--no-scene")(tmp))),
    ("`twinrt run DIR --protocol P`", "unknown protocol", "usage error (exit 2)",
     _cli("run", "{tmp}", "--out", "{tmp}/out", "--protocol", "prostate")),
    ("`twinrt dvh DIR`", "truncated RTDOSE file", "DicomImportError (exit 2)",
     lambda tmp: (_truncate(next(_export(tmp).glob("RTDOSE*.dcm"))), _cli("dvh", "{tmp}/case")(tmp))),
    ("`twinrt toxicity evaluate DIR`", "text in a number column of trajectories.csv", "CohortCsvError (exit 2)",
     lambda tmp: ((tmp / "trajectories.csv").write_text("patient_id,organ,endpoint,fraction,x\n"
                                                        "P1,Esophagus,esophagitis,1,abc\n"),
                  (tmp / "outcomes.csv").write_text("patient_id,organ,endpoint,grade,onset_fraction\n"
                                                    "P1,Esophagus,esophagitis,0,\n"),
                  _cli("toxicity", "evaluate", "{tmp}")(tmp))),
    ("`twinrt export --openkbp FILE`", "file does not exist", "MissingInputError (exit 2)",
     _cli("export", "--openkbp", "{tmp}/pt_1.npz", "--out", "{tmp}/out")),
    ("`twinrt plan DIR`", "a target that is not a structure", "StructureError (exit 2)",
     lambda tmp: (_export(tmp), _cli("plan", "{tmp}/case", "--out", "{tmp}/out", "--target", "Nope", "--dose-gy", "70",
                                     "--fractions", "35")(tmp))),
    ("`twinrt validate DIR`", "folder does not exist", "MissingInputError (exit 2)",
     _cli("validate", "{tmp}/nope")),
    ("`twinrt dose-predict predict DIR`", "no PTV among the structures", "StructureError (exit 2)",
     lambda tmp: (_export(tmp, no_target=True), _cli("dose-predict", "predict", "{tmp}/case", "--out",
                                                     "{tmp}/out")(tmp))),
    ("`twinrt contour oar DIR`", "folder without a CT series", "MissingInputError (exit 2)",
     lambda tmp: (tmp.joinpath("empty").mkdir(), _cli("contour", "oar", "{tmp}/empty", "--out", "{tmp}/out")(tmp))),
    ("`twinrt twin run COURSE`", "a course folder without a plan folder", "MissingInputError (exit 2)",
     lambda tmp: (tmp.joinpath("course").mkdir(), _cli("twin", "run", "{tmp}/course", "--out", "{tmp}/out")(tmp))),
    ("`twinrt toxicity predict DIR --model M`", "model file does not exist", "MissingInputError (exit 2)",
     lambda tmp: (_build_cohort(tmp), _cli("toxicity", "predict", "{tmp}", "--model", "{tmp}/none.pt")(tmp))),
    ("`twinrt toxicity simulate-cohort --pet-fractions F`", "fraction 0", "usage error (exit 2)",
     _cli("toxicity", "simulate-cohort", "--seed", "1", "--pet-fractions", "0,5", "--out", "{tmp}/c")),
    ("`Grid(shape, spacing_mm)`", "spacing NaN or text", "InvalidInputError",
     lambda tmp: Grid((2, 2, 2), ("a", 1.0, 1.0))),
    ("`Grid(shape, spacing_mm)`", "absurd size (100000³ voxels)", "InvalidInputError",
     lambda tmp: Grid((100000, 100000, 100000), (1.0, 1.0, 1.0))),
    ("`Image(array, grid)`", "NaN or infinite voxels", "InvalidInputError",
     lambda tmp: Image(np.full(G.shape, np.nan, np.float32), G)),
    ("`Image(array, grid)`", "array shape other than the grid's", "GeometryError",
     lambda tmp: Image(np.zeros((3, 2, 2)), G)),
    ("`Dose(array, grid)`", "NaN, infinite or negative dose", "DoseError",
     lambda tmp: Dose(np.full(G.shape, -1.0, np.float32), G)),
    ("`Structure(name, mask, grid)`", "mask on another grid", "GeometryError",
     lambda tmp: Structure("A", np.zeros((3, 2, 2), bool), G)),
    ("`Prescription(target, dose_gy, fractions)`", "NaN Gy or 0 fractions", "InvalidInputError",
     lambda tmp: Prescription("PTV70", float("nan"), 35)),
    ("`import_case(folder)`", "a CT series with a missing slice", "DicomImportError",
     lambda tmp: __import__("twinrt.dicom.folder", fromlist=["x"]).import_case(_export(tmp, gap=True))),
    ("`read_rtstruct(path, ct)` (and every DICOM reader)", "damaged file (truncated, flipped bytes)",
     "DicomImportError", lambda tmp: __import__("twinrt.dicom.rtstruct", fromlist=["x"]).read_rtstruct(
         _truncate(next(_export(tmp).glob("RTSTRUCT*.dcm"))), small_case().ct)),
    ("`read_pet_series(folder)`", "no PatientWeight (SUV impossible)", "DicomImportError", _pet_without_weight),
    ("`plan_case(case)`", "no prescription", "InvalidInputError",
     lambda tmp: _plan(Case("P", CT, [_target(FULL)], {}, [], {}))),
    ("`plan_case(case)`", "empty target", "StructureError",
     lambda tmp: _plan(Case("P", CT, [_target(np.zeros(G.shape, bool))], {}, [],
                            {"prescriptions": [Prescription("PTV70", 70.0, 35)]}))),
    ("`predict_case(case)`", "no PTV among the structures", "StructureError",
     lambda tmp: __import__("twinrt.dosepredict.predict", fromlist=["x"]).predict_case(
         Case("P", CT, [Structure("Brainstem", FULL, G)], {}, [], {}))),
    ("`contour_case(case)`", "CT too small (4 × 4 × 4 voxels)", "InvalidInputError",
     lambda tmp: __import__("twinrt.autocontour.oar", fromlist=["x"]).contour_case(
         Case("P", Image(np.zeros((4, 4, 4), np.int16), Grid((4, 4, 4), (1.0, 1.0, 1.0))), [], {}, [], {}))),
    ("`structure_dvh(dose, structure)`", "empty structure", "StructureError",
     lambda tmp: __import__("twinrt.dvh", fromlist=["x"]).structure_dvh(
         Dose(np.ones(G.shape, np.float32), G), Structure("E", np.zeros(G.shape, bool), G))),
    ("`load_goal_set(path)`", "not JSON", "InvalidInputError",
     lambda tmp: (tmp.joinpath("g.json").write_text("{goals: ["),
                  __import__("twinrt.planning.evaluation", fromlist=["x"]).load_goal_set(tmp / "g.json"))),
    ("`CaseTimeline(...)`", "0 fractions or a start date 'yesterday'", "InvalidInputError",
     lambda tmp: __import__("twinrt.twin.timeline", fromlist=["x"]).CaseTimeline(small_case(), "planned", 0,
                                                                                 "2026-01-05")),
    ("`CaseTimeline.load(folder)`", "damaged array file", "DamagedFileError", _timeline_damaged),
    ("`DigitalTwin.add_fraction(fraction)`", "a fraction of another patient", "FractionRefusedError",
     _twin_refuses_other_patient),
    ("`trajectories_from_twin(twin, organs)`", "an organ without a toxicity endpoint", "InvalidInputError",
     _features_no_endpoint),
    ("`ToxicityModel.load(path)`", "weights changed after training (sha256 differs)", "WeightsIntegrityError",
     _toxicity_weights_changed),
    ("`AuditLog.load(path)`", "an entry edited by hand", "AuditLogError", _audit_edited),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]} | {r[1]}" for r in ROWS])
def test_bad_input_gets_its_typed_error(row, tmp_path):
    entry, bad, error, call = row
    if any(k in entry for k in ("predict_case", "contour_case", "ToxicityModel", "dose-predict", "contour oar",
                                "toxicity predict")):
        pytest.importorskip("torch")
    with pytest.raises(TwinRTError) as info:
        call(tmp_path)
    if isinstance(info.value, _CliRefused):  # exit status 2, a one-line message, the typed error behind it
        assert "error:" in str(info.value), str(info.value)
        assert str(info.value).split(":")[0] == error.split(" ")[0], (str(info.value), error)
    else:
        assert type(info.value).__name__ == error.split(" ")[0], (type(info.value).__name__, str(info.value))
    assert len(str(info.value)) > 20  # says what is wrong (and what to do)


def test_readme_lists_every_row():
    readme = (ROOT / "README.md").read_text()
    missing = [f"{entry} | {bad} | {error}" for entry, bad, error, _ in ROWS
               if f"| {entry} | {bad} | {error} |" not in readme]
    assert not missing, "README's bad-input table lacks:\n" + "\n".join(missing)
