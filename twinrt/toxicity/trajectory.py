"""Organ trajectories: what ToxicityMonitor learns from, one per patient and organ.

An :class:`OrganTrajectory` holds, for one organ of one patient, a feature vector per fraction (in
fraction order; features named in :attr:`OrganTrajectory.feature_names`), the toxicity outcome
(the highest CTCAE grade and the fraction at which grade ≥ 1 began, ``None`` when it never did),
and what the LKB baseline needs from the *planned* dose (the organ's planned dose per voxel summary:
``planned_mean_gy`` and ``planned_geud_gy`` keyed by the LKB parameter set's ``n``, or directly the
planned NTCP). A :class:`Cohort` is a list of trajectories with one feature layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError

#: Endpoints and the organs they concern (CTCAE v5 terms; LKB parameter sets in twinrt.radiobiology).
ENDPOINTS = {"xerostomia": ("Parotid",), "esophagitis": ("Esophagus",), "pneumonitis": ("Lung",),
             "cardiac": ("Heart",)}


@dataclass
class OrganTrajectory:
    """One organ of one patient over the fractions.

    :param patient_id: patient identifier.
    :param organ: organ name (TG-263 or OpenKBP spelling, e.g. ``Parotid_L`` / ``LeftParotid``).
    :param endpoint: toxicity endpoint (a key of :data:`ENDPOINTS`, e.g. ``"xerostomia"``).
    :param fractions: (T,) fraction numbers, increasing (1 = first fraction).
    :param features: (T, F) float features per fraction (NaN where a feature is missing that day).
    :param feature_names: the F feature names.
    :param grade: highest CTCAE grade observed during the course (0 = none).
    :param onset_fraction: first fraction with grade ≥ 1 (``None`` when grade is 0).
    :param n_fractions: fractions prescribed for the course.
    :param planned: planned-dose figures for the LKB baseline: ``mean_gy``, ``geud_gy`` (with the
        endpoint's LKB ``n``), ``ntcp`` (if already computed), ``lkb_set`` (parameter-set name).
    :param metadata: anything else (source, simulation seed, hidden truth of a simulated patient).
    """

    patient_id: str
    organ: str
    endpoint: str
    fractions: np.ndarray
    features: np.ndarray
    feature_names: list[str]
    grade: int = 0
    onset_fraction: Optional[int] = None
    n_fractions: int = 0
    planned: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fractions = np.asarray(self.fractions, dtype=int).ravel()
        self.features = np.asarray(self.features, dtype=np.float64)
        if self.features.ndim != 2 or self.features.shape != (self.fractions.size, len(self.feature_names)):
            raise InvalidInputError(f"{self.patient_id}/{self.organ}: features must be (fractions, features) = "
                                    f"({self.fractions.size}, {len(self.feature_names)}), got {self.features.shape}")
        if self.fractions.size and (np.diff(self.fractions) <= 0).any():
            raise InvalidInputError(f"{self.patient_id}/{self.organ}: fraction numbers must increase")
        if np.isinf(self.features).any():
            raise InvalidInputError(f"{self.patient_id}/{self.organ}: infinite feature values")
        self.grade = int(self.grade)
        if not 0 <= self.grade <= 5:
            raise InvalidInputError(f"{self.patient_id}/{self.organ}: CTCAE grade must be 0-5, got {self.grade}")
        if (self.grade >= 1) != (self.onset_fraction is not None):
            raise InvalidInputError(f"{self.patient_id}/{self.organ}: an onset fraction is needed exactly when the "
                                    f"grade is ≥ 1 (grade {self.grade}, onset {self.onset_fraction})")
        if self.onset_fraction is not None:
            self.onset_fraction = int(self.onset_fraction)

    @property
    def toxic(self) -> bool:
        """Grade ≥ 1 during the course."""
        return self.grade >= 1

    def label_at(self, fraction: int) -> int:
        """1 when grade ≥ 1 has begun by ``fraction`` (inclusive), else 0."""
        return int(self.onset_fraction is not None and fraction >= self.onset_fraction)


@dataclass
class Cohort:
    """Trajectories sharing one feature layout (the unit a model is trained and evaluated on)."""

    trajectories: list[OrganTrajectory]
    description: str = ""

    def __post_init__(self) -> None:
        if self.trajectories:
            names = self.trajectories[0].feature_names
            for t in self.trajectories[1:]:
                if t.feature_names != names:
                    raise InvalidInputError(f"{t.patient_id}/{t.organ} has other features than "
                                            f"{self.trajectories[0].patient_id}; a cohort needs one feature layout")

    @property
    def feature_names(self) -> list[str]:
        """The common feature names ([] for an empty cohort)."""
        return list(self.trajectories[0].feature_names) if self.trajectories else []

    @property
    def patients(self) -> list[str]:
        """Patient ids, in first-appearance order."""
        return list(dict.fromkeys(t.patient_id for t in self.trajectories))

    def for_endpoint(self, endpoint: str) -> "Cohort":
        """The trajectories of one endpoint."""
        return Cohort([t for t in self.trajectories if t.endpoint == endpoint], self.description)

    def without_features(self, prefixes: Sequence[str]) -> "Cohort":
        """The same trajectories without the features whose names start with any of ``prefixes`` (also
        their ``d_`` changes), e.g. ``("pet_",)`` to see the cohort as if it had no PET."""
        from dataclasses import replace

        strip = tuple(prefixes) + tuple(f"d_{p}" for p in prefixes)
        keep = [i for i, n in enumerate(self.feature_names) if not n.startswith(strip)]
        return Cohort([replace(t, features=t.features[:, keep], feature_names=[t.feature_names[i] for i in keep],
                               planned=dict(t.planned), metadata=dict(t.metadata)) for t in self.trajectories],
                      self.description)

    def select(self, patients: Sequence[str], exclude: bool = False) -> "Cohort":
        """The trajectories of ``patients`` (or of all others when ``exclude``)."""
        keep = set(patients)
        return Cohort([t for t in self.trajectories if (t.patient_id in keep) != exclude], self.description)
