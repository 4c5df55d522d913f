"""Fuzz targets for every file importer (issue 10), shared by the fuzzing benchmark and the regression test.

Each :class:`Target` knows how to build its **seed** files with TwinRT's own writers (valid inputs),
and how to run its importer on arbitrary bytes in place of one of those files. A run that ends in one
of TwinRT's own typed errors (:class:`twinrt.errors.TwinRTError`) or succeeds is fine; anything else
is a crash. ``bench/fuzz_importers.py`` drives the targets with atheris (coverage-guided, bounded in
time) and keeps crashing inputs under ``tests/data/fuzz_regressions/<target>/``;
``tests/test_fuzz_regressions.py`` replays those and a fixed set of mutations of the seeds, without
atheris.

Targets: ``ct_series``, ``rtstruct``, ``rtdose``, ``rtplan``, ``pet_series``, ``dicom_folder``
(:func:`twinrt.dicom.folder.import_case`), ``goal_file``, ``timeline`` (``timeline.json`` of a saved
course), ``timeline_arrays`` (its planning ``.npz``), ``toxicity_manifest``, ``dose_model_manifest``,
``cohort_csv`` and ``audit_log``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from twinrt.errors import TwinRTError

#: Where crashing inputs found by fuzzing are kept (one folder per target).
REGRESSIONS_DIR = Path(__file__).resolve().parent / "data" / "fuzz_regressions"


def small_case():
    """A 6 x 8 x 10 CT with a body and a target, a dose on its own grid and a prescription."""
    from twinrt.geometry import Grid
    from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType

    shape = (6, 8, 10)
    grid = Grid(shape, (3.0, 3.0, 4.0), (-13.5, -10.5, -10.0))
    hu = np.random.default_rng(3).integers(-1000, 1500, shape).astype(np.int16)
    body = np.zeros(shape, bool)
    body[1:5, 1:7, 1:9] = True
    ptv = np.zeros(shape, bool)
    ptv[2:4, 3:5, 3:7] = True
    structures = [Structure("BODY", body, grid, (0, 255, 0), StructureType.EXTERNAL),
                  Structure("PTV70", ptv, grid, (255, 0, 0), StructureType.TARGET)]
    dgrid = Grid((4, 5, 6), (5.0, 5.0, 6.0), (-12.0, -10.0, -9.0))
    k, j, i = np.indices(dgrid.shape, dtype=float)
    dose = Dose((70 * np.exp(-((k - 2) ** 2 + (j - 2) ** 2 + (i - 3) ** 2) / 8)).astype(np.float32), dgrid,
                name="planned", source="fuzz seed")
    plan = Plan("AI", [Prescription("PTV70", 70.0, 35)])
    return Case("FUZZ-1", Image(hu, grid), structures, {"planned": dose}, [plan], {"patient_name": "Fuzz^Seed"})


class Target:
    """One importer under fuzzing.

    :param name: the target's name.
    :param build: ``build(workdir)`` writes the valid files and returns the path of the file the
        fuzzer replaces.
    :param load: ``load(path)`` runs the importer on that file (or its folder).
    """

    def __init__(self, name: str, build: Callable[[Path], Path], load: Callable[[Path], object]):
        self.name = name
        self._build = build
        self._load = load
        self.workdir: Optional[Path] = None
        self.path: Optional[Path] = None
        self.seed: bytes = b""

    def setup(self, workdir: Path) -> "Target":
        """Write the seed files into ``workdir`` (once)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.path = self._build(workdir)
        self.seed = self.path.read_bytes()
        self._load(self.path)  # the seed itself must import, without any error
        return self

    def load(self, data: bytes) -> Optional[TwinRTError]:
        """Put ``data`` in place of the fuzzed file and run the importer; TwinRT errors are fine (returned)."""
        assert self.path is not None, "call setup() first"
        self.path.write_bytes(data)
        try:
            self._load(self.path)
        except TwinRTError as exc:
            return exc
        return None


# ------------------------------------------------------------------------------------------ builders
def _ct_folder(work: Path) -> tuple[Path, object, object]:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.ct import write_ct_series

    case = small_case()
    ref = write_ct_series(case.ct, DicomContext.from_case(case), work / "ct")
    return work / "ct", case, ref


def _build_ct(work: Path) -> Path:
    folder, _, _ = _ct_folder(work)
    return sorted(folder.glob("CT_*.dcm"))[2]


def _load_ct(path: Path) -> None:
    from twinrt.dicom.ct import read_ct_series

    read_ct_series(path.parent)


_RTSTRUCT_CONTEXT: dict[str, object] = {}


def _build_rtstruct(work: Path) -> Path:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.rtstruct import write_rtstruct

    folder, case, ref = _ct_folder(work)
    _RTSTRUCT_CONTEXT.update(image=case.ct, ref=ref)
    path = work / "rs.dcm"
    write_rtstruct(case.structures, ref, DicomContext.from_case(case), path)
    return path


def _load_rtstruct(path: Path) -> None:
    from twinrt.dicom.rtstruct import read_rtstruct

    read_rtstruct(path, _RTSTRUCT_CONTEXT["image"], _RTSTRUCT_CONTEXT["ref"])


def _build_rtdose(work: Path) -> Path:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.rtdose import write_rtdose

    case = small_case()
    path = work / "rd.dcm"
    write_rtdose(case.doses["planned"], DicomContext.from_case(case), path)
    return path


def _load_rtdose(path: Path) -> None:
    from twinrt.dicom.rtdose import read_rtdose

    read_rtdose(path)


def _build_rtplan(work: Path) -> Path:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.rtplan import write_rtplan

    case = small_case()
    path = work / "rp.dcm"
    write_rtplan(case.plans[0], DicomContext.from_case(case), path)
    return path


def _load_rtplan(path: Path) -> None:
    from twinrt.dicom.rtplan import read_rtplan

    read_rtplan(path)


def _build_pet(work: Path) -> Path:
    from twinrt.dicom.common import DicomContext
    from twinrt.dicom.pet import write_pet_series
    from twinrt.model import Image

    case = small_case()
    suv = Image(np.abs(case.ct.array.astype(np.float32)) / 500.0, case.ct.grid, "PT")
    write_pet_series(suv, DicomContext.from_case(case), work / "pt")
    return sorted((work / "pt").glob("PT_*.dcm"))[1]


def _load_pet(path: Path) -> None:
    from twinrt.dicom.pet import read_pet_series

    read_pet_series(path.parent)


def _build_folder(work: Path) -> Path:
    from twinrt.dicom.folder import export_case

    files = export_case(small_case(), work / "case")
    return files["rtstruct"][0]


def _load_folder(path: Path) -> None:
    from twinrt.dicom.folder import import_case

    import_case(path.parent)


def _build_goal_file(work: Path) -> Path:
    from twinrt.planning.evaluation import _resolve_path

    path = work / "goals.json"
    shutil.copyfile(_resolve_path("head_and_neck_openkbp"), path)
    return path


def _load_goal_file(path: Path) -> None:
    from twinrt.planning.evaluation import load_goal_set

    load_goal_set(path)


def _build_timeline(work: Path, file: str = "timeline.json") -> Path:
    from twinrt.twin.timeline import CaseTimeline

    case = small_case()
    CaseTimeline(case, "planned", 35, "2026-01-05").save(work / "timeline")
    return work / "timeline" / file


def _load_timeline(path: Path) -> None:
    from twinrt.twin.timeline import CaseTimeline

    CaseTimeline.load(path.parent)


def _build_toxicity_manifest(work: Path) -> Path:
    from twinrt.toxicity.cli import shipped_model_path

    src = shipped_model_path()
    for suffix in (".pt", ".json"):
        shutil.copyfile(src.with_suffix(suffix), work / (src.stem + suffix))
    return work / (src.stem + ".json")


def _load_toxicity_manifest(path: Path) -> None:
    from twinrt.toxicity.model import ToxicityModel

    ToxicityModel.load(path)


def _build_dose_manifest(work: Path) -> Path:
    from twinrt.dosepredict.weights import package_models_dir

    manifest = json.loads((package_models_dir() / "models.json").read_text())
    entry = next(m for m in manifest["models"] if m["id"] == manifest["default"])
    target = work / "models"
    target.mkdir(exist_ok=True)
    shutil.copyfile(package_models_dir() / entry["file"], target / entry["file"])
    path = target / (Path(entry["file"]).stem + ".json")
    path.write_text(json.dumps(entry, indent=1))
    return path


def _load_dose_manifest(path: Path) -> None:
    from twinrt.dosepredict.weights import load_model

    load_model(path)


def _build_cohort_csv(work: Path) -> Path:
    (work / "trajectories.csv").write_text(
        "patient_id,organ,endpoint,fraction,bed_mean,ct_mean,pet_mean\n"
        "P1,Parotid_L,xerostomia,1,1.9,31.5,1.6\nP1,Parotid_L,xerostomia,2,3.8,,\n"
        "P2,Esophagus,esophagitis,1,2.0,40.0,\n")
    (work / "outcomes.csv").write_text(
        "patient_id,organ,endpoint,grade,onset_fraction,n_fractions,planned_mean_gy\n"
        "P1,Parotid_L,xerostomia,2,2,35,26.0\nP2,Esophagus,esophagitis,0,,35,\n")
    return work / "trajectories.csv"


def _load_cohort_csv(path: Path) -> None:
    from twinrt.toxicity.csvio import read_cohort_csv

    read_cohort_csv(path, path.parent / "outcomes.csv")


def _build_audit(work: Path) -> Path:
    from twinrt.audit import AuditLog

    log = AuditLog()
    log.ai_action("contoured 12 organs", {"model": "m", "seconds": 1.5})
    log.human_message("Dr Who", "looks fine")
    return log.save(work / "AUDIT.jsonl")


def _load_audit(path: Path) -> None:
    from twinrt.audit import AuditLog

    AuditLog.load(path)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ct_series", _build_ct, _load_ct),
    Target("rtstruct", _build_rtstruct, _load_rtstruct),
    Target("rtdose", _build_rtdose, _load_rtdose),
    Target("rtplan", _build_rtplan, _load_rtplan),
    Target("pet_series", _build_pet, _load_pet),
    Target("dicom_folder", _build_folder, _load_folder),
    Target("goal_file", _build_goal_file, _load_goal_file),
    Target("timeline", _build_timeline, _load_timeline),
    Target("timeline_arrays", lambda w: _build_timeline(w, "planning.npz"), _load_timeline),
    Target("toxicity_manifest", _build_toxicity_manifest, _load_toxicity_manifest),
    Target("dose_model_manifest", _build_dose_manifest, _load_dose_manifest),
    Target("cohort_csv", _build_cohort_csv, _load_cohort_csv),
    Target("audit_log", _build_audit, _load_audit),
)}


def mutations(seed: bytes, n: int, rng_seed: int = 0) -> list[bytes]:
    """``n`` deterministic mutations of ``seed``: truncations, byte flips, inserted and deleted runs,
    and replaced digits/brackets (what breaks parsers of binary and text formats alike)."""
    rng = np.random.default_rng(rng_seed)
    out = [b"", seed[: len(seed) // 2], seed[:132], seed + b"\x00" * 7]
    while len(out) < n:
        data = bytearray(seed)
        kind = int(rng.integers(5))
        if not data:
            break
        pos = int(rng.integers(len(data)))
        if kind == 0:
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.integers(len(data)))
                data[p] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            del data[pos: pos + int(rng.integers(1, 64))]
        elif kind == 2:
            data[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8))
        elif kind == 3:
            data[pos: pos + 4] = b"\xff\xff\xff\x7f"  # a huge length or value
        else:
            for p in rng.choice(len(data), size=min(8, len(data)), replace=False):
                c = data[int(p)]
                if chr(c) in "0123456789":
                    data[int(p)] = ord("9") if c != ord("9") else ord("-")
                elif chr(c) in "[]{},\":":
                    data[int(p)] = ord(" ")
        out.append(bytes(data))
    return out[:n]


def regression_inputs(name: str) -> list[Path]:
    """Crashing inputs kept for target ``name`` (files under :data:`REGRESSIONS_DIR`)."""
    folder = REGRESSIONS_DIR / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


__all__ = ["TARGETS", "Target", "REGRESSIONS_DIR", "mutations", "regression_inputs", "small_case"]
