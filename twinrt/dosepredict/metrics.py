"""The OpenKBP challenge metrics, computed as the challenge computes them.

Reference: ``provided_code/dose_evaluation_class.py`` of ababier/open-kbp (MIT), Babier et al.,
Medical Physics 48(9), 2021. Per patient, with ``mask`` the possible-dose mask:

* **dose score** = ``Σ_all voxels |pred − ref| / Σ mask`` (Gy). The sum runs over every voxel and
  is divided by the number of mask voxels; with a prediction that is zero outside the mask (as
  the challenge requires, and as :mod:`twinrt.dosepredict.predict` makes it) this is the mean
  absolute error inside the mask. The challenge's dose score is the mean over patients.
* **DVH metrics**: organs at risk (Brainstem, SpinalCord, RightParotid, LeftParotid, Esophagus,
  Larynx, Mandible): ``D_0.1_cc = percentile(roi_dose, 100 − n/N·100)`` with
  ``n = max(1, round(100 / voxel_mm³))`` voxels in 0.1 cc and ``N`` the ROI's voxel count, and
  the ``mean`` dose; targets (PTV56, PTV63, PTV70): ``D_99 = percentile(roi_dose, 1)``,
  ``D_95 = percentile(…, 5)``, ``D_1 = percentile(…, 99)`` (numpy's default linear percentile).
  Only ROIs present in the patient count. For an ROI of fewer than ``n`` voxels the challenge's
  percentile argument would be negative (numpy raises); here it is clipped to 0 (the minimum).
* **DVH score** = mean absolute difference over the table of all metrics of all present ROIs of
  all patients (``np.nanmean`` over the patient × metric table, not a mean of per-patient means).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from twinrt.dosepredict.config import OAR_ROIS, PTV_ROIS
from twinrt.errors import InvalidInputError

#: Metric names of the challenge.
OAR_METRICS = ("D_0.1_cc", "mean")
TARGET_METRICS = ("D_99", "D_95", "D_1")


def dose_score(pred_gy: np.ndarray, ref_gy: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """One patient's dose score (Gy): ``Σ |pred − ref| / Σ mask`` over all voxels (module docstring)."""
    if pred_gy.shape != ref_gy.shape or pred_gy.shape != possible_dose_mask.shape:
        raise InvalidInputError(f"Dose score needs equal shapes; got prediction {pred_gy.shape}, reference "
                                f"{ref_gy.shape}, mask {possible_dose_mask.shape}")
    n = int(np.count_nonzero(possible_dose_mask))
    if n == 0:
        raise InvalidInputError("The possible-dose mask is empty; the dose score is undefined")
    diff = np.abs(pred_gy.astype(np.float64) - ref_gy.astype(np.float64))
    return float(diff.sum() / n)


def voxels_in_tenth_cc(voxel_mm: Sequence[float]) -> int:
    """``max(1, round(100 / voxel volume in mm³))``: voxels in 0.1 cc, as the challenge rounds it."""
    return int(max(1.0, float(np.round(100.0 / float(np.prod(voxel_mm))))))


def dvh_metrics(dose_gy: np.ndarray, masks: Mapping[str, np.ndarray], voxel_mm: Sequence[float],
                oars: Iterable[str] = OAR_ROIS, targets: Iterable[str] = tuple(PTV_ROIS)
                ) -> dict[tuple[str, str], float]:
    """The challenge's DVH metrics of one dose (Gy) for every present ROI.

    :param dose_gy: dose array (any axis order, same as the masks).
    :param masks: ROI name → bool mask; empty or absent ROIs are skipped.
    :param voxel_mm: the three voxel sizes (mm); only their product is used.
    :return: ``{(metric, roi): Gy}`` with metrics from :data:`OAR_METRICS` / :data:`TARGET_METRICS`.
    """
    n_tenth = voxels_in_tenth_cc(voxel_mm)
    out: dict[tuple[str, str], float] = {}
    oars, targets = tuple(oars), tuple(targets)
    for roi, mask in masks.items():
        if mask.shape != dose_gy.shape:
            raise InvalidInputError(f"Mask '{roi}' has shape {mask.shape} but the dose has {dose_gy.shape}")
        roi_dose = dose_gy[mask.astype(bool)].astype(np.float64)
        if roi_dose.size == 0:
            continue
        if roi in oars:
            q = 100.0 - n_tenth / roi_dose.size * 100.0
            out[("D_0.1_cc", roi)] = float(np.percentile(roi_dose, min(max(q, 0.0), 100.0)))
            out[("mean", roi)] = float(roi_dose.mean())
        elif roi in targets:
            out[("D_99", roi)] = float(np.percentile(roi_dose, 1))
            out[("D_95", roi)] = float(np.percentile(roi_dose, 5))
            out[("D_1", roi)] = float(np.percentile(roi_dose, 99))
    return out


@dataclass
class PatientScore:
    """One patient's challenge figures.

    :param patient_id: e.g. ``"pt_201"``.
    :param dose_score: Gy.
    :param dvh_errors: ``{(metric, roi): |pred − ref|}`` in Gy.
    """

    patient_id: str
    dose_score: float
    dvh_errors: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def dvh_score(self) -> float:
        """Mean of this patient's DVH errors (Gy); NaN when none."""
        return float(np.mean(list(self.dvh_errors.values()))) if self.dvh_errors else float("nan")


def score_patient(patient_id: str, pred_gy: np.ndarray, ref_gy: np.ndarray, masks: Mapping[str, np.ndarray],
                  possible_dose_mask: np.ndarray, voxel_mm: Sequence[float]) -> PatientScore:
    """Dose score and DVH errors of one patient (definitions in the module docstring)."""
    ref_m = dvh_metrics(ref_gy, masks, voxel_mm)
    pred_m = dvh_metrics(pred_gy, masks, voxel_mm)
    errors = {k: abs(pred_m[k] - ref_m[k]) for k in ref_m}
    return PatientScore(patient_id, dose_score(pred_gy, ref_gy, possible_dose_mask), errors)


def openkbp_scores(patients: Sequence[PatientScore]) -> tuple[float, float]:
    """The challenge's ``(dose_score, dvh_score)`` over patients (Gy).

    Dose score: mean of the patients' dose scores. DVH score: mean of every (patient, metric)
    error, as ``np.nanmean`` over the challenge's difference table.
    """
    if not patients:
        raise InvalidInputError("No patients to score")
    dose = float(np.mean([p.dose_score for p in patients]))
    errors = [e for p in patients for e in p.dvh_errors.values()]
    dvh = float(np.mean(errors)) if errors else float("nan")
    return dose, dvh
