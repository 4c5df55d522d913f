"""The treatment course as a timeline: the planning case plus one entry per fraction; saved and reloaded.

A :class:`Fraction` is what arrives on a treatment day: its date, the day's image (CT or CBCT, HU,
patient LPS), the structures drawn on it (optional), the dose delivered that day (Gy, on its own
grid; optional) and a PET of that day (SUVbw on its own grid in the same frame of reference, e.g. an
interim PET/CT; optional). A :class:`FractionRecord` is what the twin derived from it: the registration to the
planning anatomy (quality figures, Dice of propagated structures), the fraction's dose pulled back
to the planning grid, and the tumour volume seen that day.

:class:`CaseTimeline` holds the planning case, the planned dose, the number of fractions and the
accepted fractions with their records. :meth:`CaseTimeline.save` writes a folder (atomically:
``timeline.json`` + one ``.npz`` for the planning case and one per fraction); :meth:`CaseTimeline.load`
reads it back identically (arrays bit for bit).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError, reading
from twinrt.geometry import Grid
from twinrt.io_utils import atomic_dir
from twinrt.model import Case, Dose, Image, Prescription, Structure, StructureType

#: Version of the saved timeline folder (``timeline.json`` ``format``).
TIMELINE_FORMAT = "twinrt-timeline-1"
TIMELINE_FILE = "timeline.json"


def parse_date(text: str, what: str = "date") -> _dt.date:
    """An ISO date (``YYYY-MM-DD``) or DICOM date (``YYYYMMDD``); :class:`InvalidInputError` otherwise."""
    s = str(text).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return _dt.datetime.strptime(s, fmt).date()
        except ValueError:
            continue
    raise InvalidInputError(f"The {what} '{text}' is not a date; write it as YYYY-MM-DD")


def pet_mismatch(pet_patient: str, pet_frame: str, patient: str, frame: str) -> Optional[str]:
    """Why a PET does not belong to the day's image, or ``None`` when it does.

    A PET of a fraction must be of the day's patient and in the day's frame of reference (a PET/CT);
    an empty ID or frame is unknown and not compared.
    """
    if pet_patient and patient and pet_patient != patient:
        return f"the PET is of patient '{pet_patient}', the day's image of '{patient}'"
    if pet_frame and frame and pet_frame != frame:
        return f"the PET is in frame of reference {pet_frame}, the day's image in {frame}"
    return None


@dataclass
class Fraction:
    """One treatment day as it arrives.

    :param number: fraction number, 1-based.
    :param date: ISO date (``YYYY-MM-DD``).
    :param image: the day's image (CT or CBCT in HU) on its grid (patient LPS, mm).
    :param structures: structures drawn on the day's image (on ``image.grid``), may be empty.
    :param dose: the dose delivered that day (Gy) on its own grid, or ``None``.
    :param patient_id: DICOM PatientID of the day's image.
    :param frame_of_reference_uid: its frame of reference ('' when unknown).
    :param metadata: anything else (source folder, series UID, ...).
    :param pet: a PET of the day (SUVbw, g/ml) on its own grid in the day's frame of reference (the CT of a
        PET/CT, so the day's structures apply to it after resampling), or ``None``.
    """

    number: int
    date: str
    image: Image
    structures: list[Structure] = field(default_factory=list)
    dose: Optional[Dose] = None
    patient_id: str = ""
    frame_of_reference_uid: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    pet: Optional[Image] = None

    def __post_init__(self) -> None:
        if self.pet is not None:
            if not isinstance(self.pet, Image):
                raise InvalidInputError(f"The PET of fraction {self.number} must be a twinrt.model.Image (SUVbw), "
                                        f"got {type(self.pet).__name__}")
        if int(self.number) < 1:
            raise InvalidInputError(f"Fraction numbers start at 1, got {self.number}")
        self.number = int(self.number)
        self.date = parse_date(self.date, f"date of fraction {self.number}").isoformat()
        for s in self.structures:
            if not s.grid.is_same(self.image.grid):
                raise InvalidInputError(f"Structure '{s.name}' of fraction {self.number} is not on the day's image "
                                        "grid; resample it to the image first")

    def structure(self, name: str) -> Optional[Structure]:
        """The day's structure called ``name`` (case-insensitive), or ``None``."""
        return next((s for s in self.structures if s.name.lower() == name.lower()), None)


@dataclass
class FractionRecord:
    """What the twin derived from one accepted fraction.

    :param number: fraction number.
    :param date: ISO date.
    :param registration: quality figures of the registration (see :mod:`twinrt.twin.registration`).
    :param dice: Dice of each day's structure propagated to the planning CT against the planning one.
    :param tumour_volume_cc: the tumour volume on the day's image (cc), ``None`` without a tumour contour.
    :param warped_dose_gy: the fraction's dose on the planning grid (Gy, (k, j, i) float32).
    :param seconds: time the update took (s).
    :param goals: per goal (``"<structure> <metric> <comparator> <limit>"``): the planned-to-date,
        delivered and projected end-of-course values when the fraction was taken (Gy, % or cc).
    """

    number: int
    date: str
    registration: dict[str, Any]
    dice: dict[str, float]
    tumour_volume_cc: Optional[float]
    warped_dose_gy: np.ndarray
    seconds: float = 0.0
    goals: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {"number": self.number, "date": self.date, "registration": self.registration, "dice": self.dice,
                "tumour_volume_cc": self.tumour_volume_cc, "seconds": round(self.seconds, 3), "goals": self.goals}


# ------------------------------------------------------------------------------------------- arrays
def _grid_arrays(prefix: str, grid: Grid) -> dict[str, np.ndarray]:
    return {f"{prefix}shape": np.array(grid.shape), f"{prefix}spacing": np.array(grid.spacing_mm),
            f"{prefix}origin": np.array(grid.origin_mm), f"{prefix}direction": np.asarray(grid.direction)}


def _grid_from(z: Any, prefix: str) -> Grid:
    return Grid(tuple(int(v) for v in z[f"{prefix}shape"]), tuple(z[f"{prefix}spacing"]),
                tuple(z[f"{prefix}origin"]), z[f"{prefix}direction"])


def _structures_arrays(structures: list[Structure]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for n, s in enumerate(structures):
        arrays[f"mask_{n}"] = np.packbits(s.mask.reshape(-1))
        meta.append({"name": s.name, "type": s.type.value, "color": list(s.color)})
    return arrays, meta


def _structures_from(z: Any, meta: list[dict[str, Any]], grid: Grid) -> list[Structure]:
    voxels = int(np.prod(grid.shape))
    return [Structure(m["name"], np.unpackbits(z[f"mask_{n}"], count=voxels).reshape(grid.shape).astype(bool), grid,
                      tuple(m["color"]), StructureType(m["type"])) for n, m in enumerate(meta)]


def _save_image_set(path: Path, image: Image, structures: list[Structure], doses: dict[str, Dose],
                    extra: Optional[dict[str, np.ndarray]] = None) -> dict[str, Any]:
    arrays = {"image": image.array, **_grid_arrays("grid_", image.grid)}
    s_arrays, s_meta = _structures_arrays(structures)
    arrays.update(s_arrays)
    d_meta = []
    for n, (key, d) in enumerate(doses.items()):
        arrays[f"dose_{n}"] = d.array
        arrays.update(_grid_arrays(f"dgrid_{n}_", d.grid))
        d_meta.append({"key": key, "name": d.name, "dose_type": d.dose_type, "summation": d.summation,
                       "source": d.source})
    arrays.update(extra or {})
    np.savez_compressed(path, **arrays)
    return {"file": path.name, "modality": image.modality, "structures": s_meta, "doses": d_meta}


def _load_image_set(folder: Path, meta: dict[str, Any]) -> tuple[Image, list[Structure], dict[str, Dose], Any]:
    path = folder / meta["file"]
    if not path.is_file():
        raise MissingInputError(f"Timeline file {path} is missing; the timeline folder is incomplete", path)
    z = np.load(path, allow_pickle=False)
    grid = _grid_from(z, "grid_")
    image = Image(z["image"], grid, meta.get("modality", "CT"))
    structures = _structures_from(z, meta["structures"], grid)
    doses = {}
    for n, dm in enumerate(meta["doses"]):
        doses[dm["key"]] = Dose(z[f"dose_{n}"], _grid_from(z, f"dgrid_{n}_"), dm["name"], dm["dose_type"],
                                dm["summation"], dm["source"])
    return image, structures, doses, z


# ------------------------------------------------------------------------------------------- timeline
@dataclass
class CaseTimeline:
    """The course: planning case, planned dose, fractions received so far and what the twin made of them.

    :param planning: the planning case (CT, structures, doses).
    :param planned_dose: key in ``planning.doses`` of the planned (whole-course) dose, Gy.
    :param n_fractions: number of fractions prescribed.
    :param start_date: ISO date of the first fraction (planned).
    :param tumour: name of the tumour structure whose volume is followed (e.g. ``"GTV"``).
    :param fractions: accepted fractions, in order.
    :param records: one :class:`FractionRecord` per accepted fraction.
    :param metadata: anything else (twin settings, notes).
    """

    planning: Case
    planned_dose: str
    n_fractions: int
    start_date: str
    tumour: str = "GTV"
    fractions: list[Fraction] = field(default_factory=list)
    records: list[FractionRecord] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.planned_dose not in self.planning.doses:
            raise InvalidInputError(f"The planning case has no dose '{self.planned_dose}' "
                                    f"(has: {', '.join(self.planning.doses) or 'none'}); give the planned dose")
        if int(self.n_fractions) < 1:
            raise InvalidInputError(f"A course needs at least one fraction, got {self.n_fractions}")
        self.n_fractions = int(self.n_fractions)
        self.start_date = parse_date(self.start_date, "course start date").isoformat()

    @property
    def patient_id(self) -> str:
        """The planning case's PatientID."""
        return self.planning.patient_id

    @property
    def frame_of_reference_uid(self) -> str:
        """The planning frame of reference ('' when unknown)."""
        return str(self.planning.metadata.get("frame_of_reference_uid", ""))

    @property
    def delivered(self) -> int:
        """Number of fractions accepted so far."""
        return len(self.records)

    # ---------------------------------------------------------------------------------- save / load
    def save(self, folder: str | Path) -> Path:
        """Write the timeline into ``folder`` (replaced atomically: all or nothing)."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / TIMELINE_FILE).is_file())):
            raise InvalidInputError(f"{folder} exists and is not a TwinRT timeline folder; choose a new or empty folder "
                                    "(an existing timeline folder is replaced)")
        with atomic_dir(folder) as tmp:
            plan_meta = _save_image_set(tmp / "planning.npz", self.planning.ct, self.planning.structures,
                                        self.planning.doses)
            meta_plan = {k: v for k, v in self.planning.metadata.items() if _json_safe(v)}
            meta_plan["prescriptions"] = [{"target": p.target, "dose_gy": p.dose_gy, "fractions": p.fractions}
                                          for p in self.planning.prescriptions]
            fractions = []
            for f, r in zip(self.fractions, self.records):
                doses = {"delivered": f.dose} if f.dose is not None else {}
                m = _save_image_set(tmp / f"fraction_{f.number:03d}.npz", f.image, f.structures, doses,
                                    {"warped_dose_gy": r.warped_dose_gy})
                if f.pet is not None:
                    np.savez_compressed(tmp / f"fraction_{f.number:03d}_pet.npz", image=f.pet.array,
                                        **_grid_arrays("grid_", f.pet.grid))
                    m["pet"] = {"file": f"fraction_{f.number:03d}_pet.npz", "modality": f.pet.modality,
                                "structures": [], "doses": []}
                m.update({"number": f.number, "date": f.date, "patient_id": f.patient_id,
                          "frame_of_reference_uid": f.frame_of_reference_uid,
                          "metadata": {k: v for k, v in f.metadata.items() if _json_safe(v)},
                          "record": r.summary()})
                fractions.append(m)
            doc = {"format": TIMELINE_FORMAT, "patient_id": self.patient_id, "planned_dose": self.planned_dose,
                   "n_fractions": self.n_fractions, "start_date": self.start_date, "tumour": self.tumour,
                   "planning": {**plan_meta, "metadata": meta_plan}, "fractions": fractions,
                   "metadata": {k: v for k, v in self.metadata.items() if _json_safe(v)},
                   "research_use_only": True}
            (tmp / TIMELINE_FILE).write_text(json.dumps(doc, indent=1))
        return folder

    @classmethod
    @reading("TwinRT timeline folder")
    def load(cls, folder: str | Path) -> "CaseTimeline":
        """Read a folder written by :meth:`save`.

        :raises MissingInputError: no ``timeline.json`` or a missing array file.
        :raises InvalidInputError: not a TwinRT timeline, or another format version.
        """
        folder = Path(folder)
        path = folder / TIMELINE_FILE
        if not path.is_file():
            raise MissingInputError(f"{folder} is not a TwinRT timeline folder (no {TIMELINE_FILE})", path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{path} is not readable JSON ({exc}); restore it from a backup") from exc
        if not isinstance(doc, dict) or doc.get("format") != TIMELINE_FORMAT:
            raise InvalidInputError(f"{path} is not a {TIMELINE_FORMAT} file (format "
                                    f"{doc.get('format') if isinstance(doc, dict) else None!r}); it was written by "
                                    "another TwinRT version")
        try:
            pm = doc["planning"]
            ct, structures, doses, _ = _load_image_set(folder, pm)
            meta = dict(pm.get("metadata", {}))
            meta["prescriptions"] = [Prescription(**p) for p in meta.get("prescriptions", [])]
            planning = Case(doc["patient_id"], ct, structures, doses, [], meta)
            tl = cls(planning, doc["planned_dose"], doc["n_fractions"], doc["start_date"], doc.get("tumour", "GTV"),
                     metadata=dict(doc.get("metadata", {})))
            for fm in doc["fractions"]:
                image, st, fd, z = _load_image_set(folder, fm)
                pet = _load_image_set(folder, fm["pet"])[0] if fm.get("pet") else None
                tl.fractions.append(Fraction(fm["number"], fm["date"], image, st, fd.get("delivered"),
                                             fm.get("patient_id", ""), fm.get("frame_of_reference_uid", ""),
                                             dict(fm.get("metadata", {})), pet))
                r = fm["record"]
                tl.records.append(FractionRecord(r["number"], r["date"], r["registration"], r["dice"],
                                                 r["tumour_volume_cc"], z["warped_dose_gy"], r.get("seconds", 0.0),
                                                 dict(r.get("goals", {}))))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"{path} is damaged ({type(exc).__name__}: {exc}); restore it from a backup") from exc
        return tl


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
