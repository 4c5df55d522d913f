"""The deliverable plan: beams with step-and-shoot segments and MU, built from optimised weights.

:class:`PlanBeam` is one treatment beam (geometry, MLC segments, MU per fraction). It goes into
:attr:`twinrt.model.Plan.beams` next to the older beam dicts, which still describe static open
fields; :func:`twinrt.dicom.rtplan.write_rtplan` writes a ``PlanBeam`` as a step-and-shoot IMRT
beam and :func:`twinrt.dicom.rtplan.read_rtplan` gives it back.

:func:`sequence_plan` turns the optimiser's bixel weights into such a plan and reports what
sequencing cost: the delivered fluence, its error against the optimised fluence, and (with a dij)
the dose recomputed from the segments.

Monitor units: the dij (:mod:`twinrt.planning.dij`) is whole-treatment Gy per unit weight, so
``mu_per_unit_weight`` is whole-treatment MU per unit weight; segments hold MU *per fraction*
(what DICOM BeamMeterset and the linac's minimum-MU limit refer to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinrt.errors import InvalidInputError
from twinrt.model import Plan, Prescription
from twinrt.planning.beams import Beam, BeamRays
from twinrt.planning.sequencing import (Segment, fluence_map, segments_to_weights, sequence_beam,
                                        sequencing_loss)


@dataclass
class PlanBeam:
    """One step-and-shoot IMRT beam.

    :param beam: geometry: gantry and couch angles (degrees), isocentre (LPS, mm), SAD (mm),
        energy (MV). The collimator angle is 0 (the BEV frame of :mod:`twinrt.planning.beams`).
    :param segments: MLC apertures with MU per fraction, in delivery order; all share one set of
        leaf boundaries.
    :param name: beam name (DICOM BeamName); default ``G<gantry>``.
    :param machine: treatment machine name (at most 16 characters in DICOM).
    :param dose_rate_mu_per_min: nominal dose rate (MU/min), written as DoseRateSet.
    """

    beam: Beam
    segments: list[Segment] = field(default_factory=list)
    name: str = ""
    machine: str = "TwinRT"
    dose_rate_mu_per_min: float = 600.0

    def __post_init__(self) -> None:
        self.segments = list(self.segments)
        if not self.name:
            self.name = f"G{self.beam.gantry_deg:g}"
        bounds = {s.leaf_boundaries_mm for s in self.segments}
        if len(bounds) > 1:
            raise InvalidInputError(f"Beam '{self.name}': its segments use different leaf boundaries; "
                                    "sequence every segment of a beam with one MLC")
        if not (self.dose_rate_mu_per_min > 0 and math.isfinite(self.dose_rate_mu_per_min)):
            raise InvalidInputError(f"Beam '{self.name}': dose rate must be a positive number of MU/min")

    @property
    def meterset_mu(self) -> float:
        """Beam MU per fraction (the sum of its segments' MU)."""
        return float(sum(s.mu for s in self.segments))

    @property
    def leaf_boundaries_mm(self) -> tuple[float, ...]:
        """Leaf-pair edges along IEC Y (mm); empty when the beam has no segments."""
        return self.segments[0].leaf_boundaries_mm if self.segments else ()

    @property
    def jaws_mm(self) -> tuple[float, float, float, float]:
        """X1, X2, Y1, Y2 jaw positions (mm at the isocentre): the bounding box of all apertures.

        Jaws stay fixed for the whole beam, which is what step-and-shoot machines expect, and
        closing them onto the apertures hides the parked leaf pairs outside it.
        """
        opened = [(s, s.open_pairs) for s in self.segments if s.open_pairs.any()]
        if not opened:
            return (0.0, 0.0, 0.0, 0.0)
        x1 = min(float(np.min(np.asarray(s.left_mm)[o])) for s, o in opened)
        x2 = max(float(np.max(np.asarray(s.right_mm)[o])) for s, o in opened)
        rows = np.flatnonzero(np.any([o for _, o in opened], axis=0))
        bounds = self.leaf_boundaries_mm
        return (x1, x2, float(bounds[rows[0]]), float(bounds[rows[-1] + 1]))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what :func:`dataclasses.asdict` gives); :meth:`from_dict` inverts it."""
        return {"beam": {"gantry_deg": self.beam.gantry_deg, "couch_deg": self.beam.couch_deg,
                         "isocenter_mm": list(self.beam.isocenter_mm), "sad_mm": self.beam.sad_mm,
                         "bixel_width_mm": self.beam.bixel_width_mm, "energy_mv": self.beam.energy_mv},
                "segments": [{"leaf_boundaries_mm": list(s.leaf_boundaries_mm), "left_mm": list(s.left_mm),
                              "right_mm": list(s.right_mm), "mu": s.mu} for s in self.segments],
                "name": self.name, "machine": self.machine, "dose_rate_mu_per_min": self.dose_rate_mu_per_min}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlanBeam":
        """The beam of a :meth:`to_dict` (or :func:`dataclasses.asdict`) dict, e.g. from a Slicer scene."""
        beam = data["beam"]
        if not isinstance(beam, Beam):
            beam = Beam(**{k: (tuple(v) if k == "isocenter_mm" else v) for k, v in dict(beam).items()})
        segments = [s if isinstance(s, Segment) else Segment(**s) for s in data.get("segments", [])]
        return cls(beam, segments, str(data.get("name", "")), str(data.get("machine", "TwinRT")),
                   float(data.get("dose_rate_mu_per_min", 600.0)))


def is_plan_beam_dict(beam: object) -> bool:
    """True for a dict that describes a :class:`PlanBeam` (it has ``beam`` and ``segments``)."""
    return isinstance(beam, dict) and "segments" in beam and "beam" in beam


def split_weights(weights: np.ndarray, beams: list[BeamRays]) -> list[np.ndarray]:
    """Plan-wide bixel weights (dij column order: beam after beam) split into one array per beam.

    :param weights: (n_bixels,) weights.
    :param beams: the beams' rays in dij column order.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    counts = [b.n_rays for b in beams]
    if w.shape[0] != sum(counts):
        raise InvalidInputError(f"{w.shape[0]} weights given for {sum(counts)} bixels in {len(beams)} beams")
    return np.split(w, np.cumsum(counts)[:-1])


@dataclass
class SequencingResult:
    """What :func:`sequence_plan` produces.

    :param plan: the plan, with one :class:`PlanBeam` per beam that has segments.
    :param delivered_weights: (n_bixels,) weights the segments deliver (dij column order).
    :param report: ``beams`` (per beam: name, segments, MU per fraction, modulation factor,
        fluence errors), plan-wide ``relative_fluence_error``, ``max_fluence_error``,
        ``n_segments``, ``total_mu`` (per fraction) and, with a dij, ``relative_dose_error``
        (‖D_seq − D_opt‖₂ / ‖D_opt‖₂) and ``max_dose_difference_gy``.
    :param delivered_dose_gy: dose recomputed from the segments (k, j, i), when a dij was given.
    """

    plan: Plan
    delivered_weights: np.ndarray
    report: dict[str, Any]
    delivered_dose_gy: np.ndarray | None = None


def sequence_plan(beams: list[BeamRays], weights: np.ndarray, prescriptions: list[Prescription], *,
                  mu_per_unit_weight: float, label: str = "TwinRT", levels: int = 10, leaf_width_mm: float = 5.0,
                  min_segment_mu: float = 0.0, leaf_origin_mm: float | None = None, machine: str = "TwinRT",
                  dij: Any = None, names: list[str] | None = None) -> SequencingResult:
    """Sequence every beam of an optimised plan and build the deliverable :class:`Plan`.

    :param beams: the beams' rays, in dij column order.
    :param weights: (n_bixels,) optimised bixel weights.
    :param prescriptions: target prescriptions; the plan's fractions are their largest number.
    :param mu_per_unit_weight: whole-treatment MU per unit bixel weight (the machine calibration
        of the dij); each segment holds this divided by the number of fractions (MU per fraction).
    :param label: plan label (DICOM RTPlanLabel, 16 characters kept).
    :param levels: intensity levels per beam (see :func:`twinrt.planning.sequencing.sequence_beam`).
    :param leaf_width_mm: MLC leaf width at the isocentre (mm).
    :param min_segment_mu: least MU per fraction of any segment.
    :param leaf_origin_mm: a leaf-pair edge of the MLC (mm); default aligned with the bixels.
    :param machine: treatment machine name.
    :param dij: optional :class:`twinrt.planning.dij.DoseInfluence` over the same beams: the dose
        is recomputed from the segments and compared with the optimised dose.
    :param names: beam names; default ``G<gantry>``.
    :return: plan, delivered weights, report and (with a dij) the delivered dose.
    """
    if not (mu_per_unit_weight > 0 and math.isfinite(mu_per_unit_weight)):
        raise InvalidInputError(f"MU per unit weight must be a positive number, got {mu_per_unit_weight}")
    if names is not None and len(names) != len(beams):
        raise InvalidInputError(f"{len(names)} beam names given for {len(beams)} beams")
    if dij is not None and [b.n_rays for b in dij.beams] != [b.n_rays for b in beams]:
        raise InvalidInputError("The dij was computed for other beams; pass the dij of these beams")
    plan = Plan(label, list(prescriptions))
    # Segments are per fraction: that is what BeamMeterset and a linac's minimum MU refer to.
    mu_per_weight_fraction = mu_per_unit_weight / plan.fractions
    per_beam = split_weights(weights, beams)
    delivered_parts, beam_reports = [], []
    for n, (rays, w) in enumerate(zip(beams, per_beam)):
        segments = sequence_beam(fluence_map(rays, w), levels, leaf_width_mm, min_segment_mu,
                                 mu_per_weight_fraction, leaf_origin_mm)
        delivered = segments_to_weights(segments, rays, mu_per_weight_fraction)
        delivered_parts.append(delivered)
        name = names[n] if names else ""
        if segments:
            plan.beams.append(PlanBeam(rays.beam, segments, name, machine))
            name = plan.beams[-1].name
        # A beam with no segments (zero fluence, or below half the minimum MU) is left out of
        # the plan: DICOM cannot describe a treatment beam that delivers nothing.
        beam_reports.append({"name": name or f"G{rays.beam.gantry_deg:g}", "delivered": bool(segments),
                             **sequencing_loss(w, delivered, segments, mu_per_weight_fraction)})
    # Plan-wide errors weigh every bixel alike, so a heavily weighted beam counts for more.
    delivered_all = np.concatenate(delivered_parts) if delivered_parts else np.zeros(0)
    report: dict[str, Any] = {"beams": beam_reports, **sequencing_loss(weights, delivered_all),
                              "n_segments": sum(r["n_segments"] for r in beam_reports),
                              "total_mu": sum(r["total_mu"] for r in beam_reports)}
    dose = None
    if dij is not None:
        # Same dij for both doses: the difference is the sequencing loss alone, not engine noise.
        ideal_dose = np.asarray(dij.dose(weights), dtype=np.float64)
        dose = dij.dose(delivered_all)
        norm = float(np.linalg.norm(ideal_dose))
        diff = dose.astype(np.float64) - ideal_dose
        report["relative_dose_error"] = float(np.linalg.norm(diff)) / norm if norm > 0 else 0.0
        report["max_dose_difference_gy"] = float(np.max(np.abs(diff))) if diff.size else 0.0
    return SequencingResult(plan, delivered_all, report, dose)
