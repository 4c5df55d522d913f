"""Score a dose-prediction model on OpenKBP patients with the challenge metrics.

:func:`evaluate_openkbp` reads every ``pt_*.npz`` of a folder, predicts each patient at the full
128³ resolution, and scores it against the reference dose with :mod:`twinrt.dosepredict.metrics`
(dose score and DVH score exactly as the OpenKBP challenge computes them). Inference time is the
prediction alone (input building, network, upsampling), not file reading or scoring.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import twinrt
from twinrt.dosepredict.inputs import load_openkbp_arrays
from twinrt.dosepredict.metrics import openkbp_scores, score_patient
from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.progress import CancelToken, ProgressCallback, report


def openkbp_files(folder: str | Path, limit: Optional[int] = None) -> list[Path]:
    """The ``pt_N.npz`` files of a folder, by patient number (the first ``limit`` when given).

    :raises MissingInputError: the folder does not exist or holds no ``pt_*.npz``.
    :raises InvalidInputError: ``limit`` < 1.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"{folder} is not a folder; pass a folder of OpenKBP pt_N.npz files "
                                "(e.g. ../shared/data/openkbp/validation)", folder)
    files = sorted(folder.glob("pt_*.npz"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise MissingInputError(f"{folder} holds no pt_N.npz files; pass a folder of OpenKBP patients "
                                "(e.g. ../shared/data/openkbp/validation)", folder)
    if limit is not None:
        if limit < 1:
            raise InvalidInputError(f"--limit must be >= 1, got {limit}")
        files = files[:limit]
    return files


def evaluate_openkbp(folder: str | Path, model: str | Path | None = None, limit: Optional[int] = None,
                     mc_samples: Optional[int] = None, log: Optional[Callable[[str], None]] = print,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                     ) -> dict[str, Any]:
    """Predict and score every OpenKBP patient of ``folder``.

    :param folder: folder of ``pt_N.npz`` files.
    :param model: model id or path (default model when ``None``).
    :param limit: only the first N patients.
    :param mc_samples: MC-dropout passes per patient (default the recipe's; they cost time but do
        not change the scored dose, which is the dropout-free prediction).
    :param log: receives one line per patient and the totals.
    :return: ``dose_score``, ``dvh_score`` (Gy), ``n_patients``, ``seconds_per_patient``,
        ``model_id``, ``sha256``, ``mc_samples``, ``per_patient``.
    """
    from twinrt.dosepredict.predict import DosePredictor

    say = log or (lambda s: None)
    files = openkbp_files(folder, limit)
    predictor = DosePredictor(model)
    n_mc = predictor.config.predict.mc_samples if mc_samples is None else int(mc_samples)
    say(f"model {predictor.model_id} {predictor.version} (sha256 {predictor.sha256}), {len(files)} patient(s), "
        f"{n_mc} MC-dropout samples")
    scores, seconds, rows = [], [], {}
    for i, path in enumerate(files):
        report(progress, i / len(files), f"patient {path.stem}", cancel)
        a = load_openkbp_arrays(path)
        pred = predictor.predict_openkbp(a, mc_samples=n_mc)
        s = score_patient(path.stem, pred.dose_gy, a.dose_gy, a.masks, a.possible_dose_mask, a.voxel_mm)
        scores.append(s)
        seconds.append(pred.seconds)
        rows[s.patient_id] = {"dose_score": s.dose_score, "dvh_score": s.dvh_score, "n_dvh_metrics": len(s.dvh_errors),
                              "seconds": pred.seconds}
        say(f"{path.stem:>8}: dose error {s.dose_score:6.3f} Gy  DVH error {s.dvh_score:6.3f} Gy "
            f"({len(s.dvh_errors)} metrics)  {pred.seconds:5.2f} s")
    dose, dvh = openkbp_scores(scores)
    result = {"dose_score": dose, "dvh_score": dvh, "n_patients": len(scores),
              "seconds_per_patient": float(np.mean(seconds)), "model_id": predictor.model_id,
              "sha256": predictor.sha256, "mc_samples": n_mc, "per_patient": rows}
    say(f"   total: dose score {dose:.3f} Gy, DVH score {dvh:.3f} Gy over {len(scores)} patient(s); "
        f"{result['seconds_per_patient']:.2f} s per patient (prediction only). {twinrt.RESEARCH_USE_ONLY}")
    report(progress, 1.0, "done", cancel)
    return result
