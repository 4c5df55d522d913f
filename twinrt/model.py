"""The patient model shared by every TwinRT stage: image, structure, dose, plan and case.

All arrays are in (k, j, i) order on a :class:`twinrt.geometry.Grid` (patient LPS, mm). A
:class:`Case` is what the importers produce, what the stages read and extend, and what the
exporters and the Slicer scene adapter write.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinrt.errors import DoseError, InvalidInputError, StructureError
from twinrt.geometry import Grid, resample_array


@dataclass
class Image:
    """A 3D image (CT in HU, or any scalar) on a grid.

    :param array: (k, j, i) voxel values; CT in Hounsfield units.
    :param grid: its geometry in patient LPS (mm).
    :param modality: DICOM modality, e.g. ``"CT"``.
    """

    array: np.ndarray
    grid: Grid
    modality: str = "CT"

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.grid.check_array(self.array, f"{self.modality} image")
        if self.array.dtype.kind not in "biuf":
            raise InvalidInputError(f"A {self.modality} image holds numbers; got an array of {self.array.dtype}")
        if self.array.dtype.kind == "f" and not np.isfinite(self.array).all():
            bad = int(np.count_nonzero(~np.isfinite(self.array)))
            raise InvalidInputError(f"The {self.modality} image has {bad} NaN or infinite voxels; fill them "
                                    "(e.g. with -1000 HU outside the field of view) or re-export the image")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k)."""
        return self.grid.spacing_mm

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """LPS position (mm) of the centre of voxel [0, 0, 0]."""
        return self.grid.origin_mm

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix; columns are the LPS directions of the i, j, k axes."""
        return self.grid.direction

    def resampled(self, target: Grid, order: int = 1, fill_value: float = 0.0) -> "Image":
        """This image resampled onto ``target`` (trilinear by default)."""
        return Image(resample_array(self.array, self.grid, target, order, fill_value), target, self.modality)


class StructureType(str, enum.Enum):
    """Role of a structure in planning (names are stored in files: never rename)."""

    TARGET = "TARGET"
    ORGAN = "ORGAN"
    EXTERNAL = "EXTERNAL"
    OTHER = "OTHER"

    @classmethod
    def guess(cls, name: str) -> "StructureType":
        """Guess the role from a structure name (PTV/CTV/GTV → target, body/external → external)."""
        upper = name.upper()
        if any(upper.startswith(p) for p in ("PTV", "CTV", "GTV", "ITV")) or upper in ("CORE_TARGET", "OUTERTARGET"):
            return cls.TARGET
        if upper in ("BODY", "EXTERNAL", "SKIN", "OUTLINE") or upper.startswith("BODY"):
            return cls.EXTERNAL
        return cls.ORGAN


#: Distinct default colours (RGB 0-255) for structures without one.
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128)]


def default_color(index: int) -> tuple[int, int, int]:
    """A default structure colour (RGB, 0-255) for the ``index``-th structure."""
    return _PALETTE[index % len(_PALETTE)]


@dataclass
class Structure:
    """A delineated region as a binary mask on a stated grid.

    :param name: structure (ROI) name, e.g. ``"PTV70"``.
    :param mask: boolean (k, j, i) array on ``grid``.
    :param grid: the grid the mask is defined on (usually the CT grid).
    :param color: display colour, RGB 0-255.
    :param type: target, organ, external or other.
    """

    name: str
    mask: np.ndarray
    grid: Grid
    color: tuple[int, int, int] = (255, 0, 0)
    type: StructureType = StructureType.ORGAN

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise StructureError("A structure needs a non-empty name", None)
        self.mask = np.asarray(self.mask).astype(bool, copy=False)
        self.grid.check_array(self.mask, f"mask of structure '{self.name}'")
        self.type = StructureType(self.type)
        self.color = tuple(int(c) for c in self.color)  # type: ignore[assignment]

    @property
    def volume_cc(self) -> float:
        """Volume of the mask in cc."""
        return float(self.mask.sum()) * self.grid.voxel_volume_cc

    @property
    def is_empty(self) -> bool:
        """True when no voxel is inside the structure."""
        return not bool(self.mask.any())

    def on_grid(self, target: Grid) -> np.ndarray:
        """The mask resampled to ``target``: a target voxel is inside when its centre is.

        Uses trilinear interpolation of the 0/1 mask thresholded at 0.5, which keeps volume better
        than nearest neighbour when voxel sizes differ.
        """
        if self.grid.is_same(target):
            return self.mask
        return resample_array(self.mask.astype(np.float32), self.grid, target, order=1) >= 0.5


@dataclass
class Dose:
    """A dose distribution in Gy on its own grid.

    :param array: (k, j, i) dose in Gy (float32); must be finite and non-negative.
    :param grid: the dose grid (patient LPS, mm).
    :param name: label, e.g. ``"reference"`` or ``"predicted"``.
    :param dose_type: DICOM DoseType: ``PHYSICAL`` or ``EFFECTIVE``.
    :param summation: DICOM DoseSummationType: ``PLAN``, ``FRACTION``, ...
    :param source: free-text provenance (model id and weights sha256 for AI doses).
    """

    array: np.ndarray
    grid: Grid
    name: str = "dose"
    dose_type: str = "PHYSICAL"
    summation: str = "PLAN"
    source: str = ""

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.grid.check_array(self.array, f"dose '{self.name}'")
        validate_dose_array(self.array, self.name)

    @property
    def max_gy(self) -> float:
        """Maximum dose in Gy."""
        return float(self.array.max()) if self.array.size else 0.0

    def resampled(self, target: Grid, order: int = 1) -> "Dose":
        """This dose on ``target`` (trilinear; zero outside the dose grid)."""
        arr = resample_array(self.array, self.grid, target, order=order, fill_value=0.0)
        return Dose(np.clip(arr, 0, None), target, self.name, self.dose_type, self.summation, self.source)


def validate_dose_array(array: np.ndarray, name: str = "dose") -> None:
    """Raise :class:`DoseError` for NaN, infinite or negative dose values (Gy)."""
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DoseError(f"Dose '{name}' has {bad} NaN or infinite voxels; recompute or re-export the dose")
    if array.size and float(array.min()) < 0:
        raise DoseError(f"Dose '{name}' has negative values (min {float(array.min()):.3g} Gy); "
                        "dose must be >= 0 Gy: check the dose scaling")


@dataclass
class Prescription:
    """Prescribed dose to one target."""

    target: str
    dose_gy: float
    fractions: int

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.dose_gy)) and self.dose_gy > 0) or self.fractions < 1:
            raise InvalidInputError(f"Prescription for '{self.target}' needs dose > 0 Gy and >= 1 fraction")

    @property
    def dose_per_fraction_gy(self) -> float:
        """Dose per fraction in Gy."""
        return self.dose_gy / self.fractions


#: Review states of a plan (stored in files and scenes: never rename).
PLAN_STATES = ("draft", "proposed", "approved", "rejected")
#: The name TwinRT's AI acts under; it can never review a plan.
AI_REVIEWER_NAMES = ("twinrt ai", "twinrt", "ai")


def is_human_reviewer(name: Any) -> bool:
    """True for a non-empty name that is not the AI's (:data:`AI_REVIEWER_NAMES`, any case)."""
    return isinstance(name, str) and bool(name.strip()) and name.strip().lower() not in AI_REVIEWER_NAMES


def approval_status(plan: "Plan") -> str:
    """DICOM ApprovalStatus of ``plan``: ``APPROVED`` only when its state is ``approved`` *and* a
    human reviewer is named, ``REJECTED`` likewise for ``rejected``, else ``UNAPPROVED``.

    :param plan: the plan.
    """
    if is_human_reviewer(plan.reviewer_name):
        if plan.state == "approved":
            return "APPROVED"
        if plan.state == "rejected":
            return "REJECTED"
    return "UNAPPROVED"


@dataclass
class Plan:
    """A treatment plan. Beams are filled in by AIPlanner (issue 3); the skeleton exports as RTPLAN.

    :param label: RT plan label (DICOM RTPlanLabel, at most 16 characters).
    :param prescriptions: target prescriptions.
    :param beams: :class:`twinrt.planning.plan.PlanBeam` step-and-shoot beams, or dicts describing
        static open fields (keys in :func:`twinrt.dicom.rtplan.write_rtplan`).
    :param approval: DICOM ApprovalStatus. It is *derived* from ``state`` and ``reviewer_name`` (see
        :func:`approval_status`) and any value passed is overwritten, so that no code path can mark
        a plan ``APPROVED`` without a named human review (change the state with
        :mod:`twinrt.planning.approval`). Values outside ``APPROVED``/``UNAPPROVED``/``REJECTED``
        are refused.
    :param radiation_type: DICOM RadiationType of the beams.
    :param state: review state, one of :data:`PLAN_STATES`: ``draft`` → ``proposed`` →
        ``approved`` or ``rejected``.
    :param reviewer_name: the person who approved or rejected the plan (never the AI).
    :param review_datetime: when, ISO 8601 UTC.
    :param review_comment: the reviewer's comment or rejection reason.
    """

    label: str = "TwinRT"
    prescriptions: list[Prescription] = field(default_factory=list)
    beams: list[Any] = field(default_factory=list)
    approval: str = "UNAPPROVED"
    radiation_type: str = "PHOTON"
    # Review fields come last so that positional construction (label, prescriptions, beams,
    # approval, radiation_type) keeps working.
    state: str = "draft"
    reviewer_name: str = ""
    review_datetime: str = ""
    review_comment: str = ""

    def __post_init__(self) -> None:
        if str(self.approval).upper() not in ("APPROVED", "UNAPPROVED", "REJECTED"):
            raise InvalidInputError(f"Plan approval '{self.approval}' must be one of APPROVED, UNAPPROVED, REJECTED")
        if self.state not in PLAN_STATES:
            raise InvalidInputError(f"Plan state '{self.state}' must be one of {', '.join(PLAN_STATES)}")
        self.approval = approval_status(self)

    @property
    def fractions(self) -> int:
        """Number of fractions (the largest of the prescriptions, 1 when none)."""
        return max((p.fractions for p in self.prescriptions), default=1)


@dataclass
class Case:
    """One patient: CT, structures, doses, plans and metadata.

    :param patient_id: DICOM PatientID.
    :param ct: the planning CT in HU.
    :param structures: structures, in display order, each with a unique name.
    :param doses: named doses in Gy.
    :param plans: treatment plans.
    :param metadata: everything else: ``patient_name``, ``study_instance_uid``,
        ``frame_of_reference_uid``, ``series_instance_uid``, source citation, ...
    """

    patient_id: str
    ct: Image
    structures: list[Structure] = field(default_factory=list)
    doses: dict[str, Dose] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.structures]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise StructureError(f"Duplicate structure names {sorted(dup)}; rename them so each is unique",
                                 sorted(dup)[0])

    def structure(self, name: str) -> Structure:
        """The structure called ``name`` (case-insensitive); :class:`StructureError` if absent."""
        for s in self.structures:
            if s.name == name or s.name.lower() == name.lower():
                return s
        raise StructureError(f"No structure '{name}' in case {self.patient_id}; "
                             f"available: {', '.join(s.name for s in self.structures) or 'none'}", name)

    def add_structure(self, structure: Structure) -> None:
        """Append a structure; its name must be new."""
        if any(s.name.lower() == structure.name.lower() for s in self.structures):
            raise StructureError(f"Structure '{structure.name}' already exists; choose another name",
                                 structure.name)
        self.structures.append(structure)

    @property
    def targets(self) -> list[Structure]:
        """Structures of type target."""
        return [s for s in self.structures if s.type == StructureType.TARGET]

    @property
    def prescriptions(self) -> list[Prescription]:
        """Prescriptions of the first plan, or those in ``metadata['prescriptions']``."""
        if self.plans and self.plans[0].prescriptions:
            return self.plans[0].prescriptions
        return list(self.metadata.get("prescriptions", []))
