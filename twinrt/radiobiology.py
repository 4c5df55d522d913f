"""Linear-quadratic radiobiology: BED and EQD2 from fractions, with α/β per structure (research use only).

Definitions (linear-quadratic model, no repopulation term), dose in Gy:

* BED of fractions d_1 … d_n: ``BED = Σ d_i (1 + d_i / (α/β))`` (voxel by voxel for dose maps);
  for n equal fractions of d: ``BED = n d (1 + d / (α/β))``.
* EQD2 (the total dose in 2 Gy fractions with the same BED): ``EQD2 = BED / (1 + 2 / (α/β))``.

α/β values (:data:`ALPHA_BETA_GY`) are the customary defaults, overridable per call: 10 Gy for
squamous-cell tumours of the head and neck, 3 Gy for late-responding normal tissues, 2 Gy for the
spinal cord and brainstem (Joiner MC, van der Kogel AJ (eds), *Basic Clinical Radiobiology*, 5th ed.,
CRC Press 2018, chapter "Fractionation: the linear-quadratic approach"; the issue's "tumour 10 Gy,
late-responding organs 2–3 Gy"). The DigitalTwin (issue 7) and ToxicityMonitor (issue 8) build on
these functions.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from twinrt.errors import InvalidInputError

#: Reference for :data:`ALPHA_BETA_GY`.
ALPHA_BETA_SOURCE = ("Joiner MC, van der Kogel AJ (eds). Basic Clinical Radiobiology, 5th ed. CRC Press, 2018 "
                     "(fractionation: the linear-quadratic approach)")
#: Default α/β (Gy) by tissue class.
ALPHA_BETA_GY = {"tumour": 10.0, "late": 3.0, "cns": 2.0}
#: Organs (OpenKBP / dose-prediction names) of the central nervous system: α/β of ``"cns"``.
CNS_ORGANS = ("SpinalCord", "Brainstem")


def _check_ab(alpha_beta_gy: float) -> float:
    ab = float(alpha_beta_gy)
    if not np.isfinite(ab) or ab <= 0:
        raise InvalidInputError(f"α/β must be a positive number of Gy, got {alpha_beta_gy!r}")
    return ab


def _check_dose(dose: np.ndarray, what: str) -> np.ndarray:
    d = np.asarray(dose, dtype=np.float64)
    if not np.isfinite(d).all():
        raise InvalidInputError(f"{what} has NaN or infinite values")
    if (d < 0).any():
        raise InvalidInputError(f"{what} has negative dose values (min {float(d.min()):.3g} Gy)")
    return d


def bed_from_fractions(fraction_doses: Iterable[np.ndarray | float], alpha_beta_gy: float | np.ndarray
                       ) -> np.ndarray:
    """BED (Gy) of the given fractions, voxel by voxel.

    :param fraction_doses: the dose of each fraction (Gy): scalars or arrays of one shape.
    :param alpha_beta_gy: α/β in Gy: a number, or an array broadcastable to the dose (a per-voxel map).
    :raises InvalidInputError: no fraction, negative or non-finite dose, α/β ≤ 0, shapes that differ.
    """
    ab = np.asarray(alpha_beta_gy, dtype=np.float64)
    if not np.isfinite(ab).all() or (ab <= 0).any():
        raise InvalidInputError("α/β must be positive numbers of Gy")
    total: Optional[np.ndarray] = None
    for n, dose in enumerate(fraction_doses):
        d = _check_dose(dose, f"fraction {n + 1}")
        if total is not None and d.shape != total.shape:
            raise InvalidInputError(f"fraction {n + 1} has shape {d.shape}, the earlier fractions {total.shape}")
        term = d * (1.0 + d / ab)
        total = term if total is None else total + term
    if total is None:
        raise InvalidInputError("No fraction given: BED needs at least one fraction dose")
    return total


def bed_uniform(total_dose_gy: float | np.ndarray, n_fractions: int, alpha_beta_gy: float) -> np.ndarray | float:
    """BED (Gy) of ``total_dose_gy`` given in ``n_fractions`` equal fractions."""
    if int(n_fractions) != n_fractions or n_fractions < 1:
        raise InvalidInputError(f"The number of fractions must be a positive integer, got {n_fractions!r}")
    ab = _check_ab(alpha_beta_gy)
    total = _check_dose(total_dose_gy, "total dose")
    out = total * (1.0 + total / n_fractions / ab)
    return float(out) if out.ndim == 0 else out


def eqd2(bed_gy: float | np.ndarray, alpha_beta_gy: float | np.ndarray) -> np.ndarray | float:
    """EQD2 (Gy): the total dose in 2 Gy fractions with the BED ``bed_gy``."""
    ab = np.asarray(alpha_beta_gy, dtype=np.float64)
    if not np.isfinite(ab).all() or (ab <= 0).any():
        raise InvalidInputError("α/β must be positive numbers of Gy")
    out = _check_dose(bed_gy, "BED") / (1.0 + 2.0 / ab)
    return float(out) if np.ndim(out) == 0 else out


def alpha_beta_for(name: str, is_target: bool = False, overrides: Optional[Mapping[str, float]] = None) -> float:
    """α/β (Gy) of a structure: ``overrides[name]`` when given, tumour for targets, CNS for the spinal
    cord and brainstem (under any usual spelling), late-responding tissue otherwise."""
    if overrides and name in overrides:
        return _check_ab(overrides[name])
    if is_target:
        return ALPHA_BETA_GY["tumour"]
    from twinrt.dosepredict.inputs import match_rois

    mapping, _ = match_rois([name])
    if any(organ in mapping for organ in CNS_ORGANS):
        return ALPHA_BETA_GY["cns"]
    return ALPHA_BETA_GY["late"]


def alpha_beta_map(shape: Sequence[int], structures: Sequence, default_gy: float = ALPHA_BETA_GY["late"],
                   overrides: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """Per-voxel α/β (Gy) from structures on one grid.

    Outside every structure: ``default_gy``. Inside organs: each organ's α/β
    (:func:`alpha_beta_for`); where organs overlap, the smallest (the most cautious for late effects).
    Inside targets: the tumour value, which wins over organs (the BED there is about tumour control).

    :param structures: :class:`twinrt.model.Structure` objects whose masks have ``shape``.
    """
    from twinrt.model import StructureType

    out = np.full(tuple(shape), _check_ab(default_gy), dtype=np.float64)
    organ_value = np.full(tuple(shape), np.inf)
    targets = np.zeros(tuple(shape), bool)
    for s in structures:
        if s.mask.shape != tuple(shape):
            raise InvalidInputError(f"Structure '{s.name}' has shape {s.mask.shape}, the dose {tuple(shape)}")
        if s.type == StructureType.TARGET:
            targets |= s.mask
        elif s.type == StructureType.ORGAN:
            np.minimum(organ_value, np.where(s.mask, alpha_beta_for(s.name, False, overrides), np.inf), out=organ_value)
    inside = np.isfinite(organ_value)
    out[inside] = organ_value[inside]
    out[targets] = ALPHA_BETA_GY["tumour"] if not overrides or "tumour" not in overrides else _check_ab(overrides["tumour"])
    return out


__all__ = ["ALPHA_BETA_GY", "ALPHA_BETA_SOURCE", "CNS_ORGANS", "bed_from_fractions", "bed_uniform", "eqd2",
           "alpha_beta_for", "alpha_beta_map"]
