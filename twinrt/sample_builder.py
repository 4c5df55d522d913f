"""Rebuild the bundled sample patient from ``../shared/data`` (developers only).

The sample is OpenKBP validation patient :data:`twinrt.sample.SAMPLE_SOURCE_PATIENT` exported as
DICOM (CT, RTSTRUCT, RTDOSE of the reference plan). To keep the repository small, the image is
cropped to the box that holds CT data (OpenKBP stores air outside the patient as 0) plus a margin;
voxel values, spacing and positions are unchanged inside the box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twinrt.data import OPENKBP_CITATION, load_openkbp, shared_data_dir
from twinrt.errors import MissingInputError
from twinrt.io_utils import write_text_atomic
from twinrt.model import Case, Dose, Image, Structure
from twinrt.sample import SAMPLE_DICOM_DIR, SAMPLE_SOURCE_PATIENT

#: Voxels kept around the CT data box (each side).
CROP_MARGIN_VOXELS = 2


def crop_case(case: Case, margin: int = CROP_MARGIN_VOXELS) -> Case:
    """The case cropped to the bounding box of voxels above -1000 HU (plus ``margin`` voxels).

    Doses must be on the CT grid (true for OpenKBP cases).
    """
    inside = np.argwhere(case.ct.array > -1000)
    lo = np.maximum(inside.min(axis=0) - margin, 0)
    hi = np.minimum(inside.max(axis=0) + margin + 1, case.ct.array.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = case.ct.grid.subgrid(int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))
    ct = Image(case.ct.array[sl].copy(), grid, "CT")
    structures = [Structure(s.name, s.mask[sl].copy(), grid, s.color, s.type) for s in case.structures]
    lost = [s.name for s, c in zip(case.structures, structures) if c.mask.sum() != s.mask.sum()]
    if lost:
        raise ValueError(f"Cropping would cut structures {lost}; increase the margin")
    doses = {k: Dose(d.array[sl].copy(), grid, d.name, d.dose_type, d.summation, d.source)
             for k, d in case.doses.items()}
    meta = {k: v for k, v in case.metadata.items() if k != "possible_dose_mask"}
    return Case(case.patient_id, ct, structures, doses, [], meta)


def build_sample(out: str | Path | None = None) -> Path:
    """Export the sample patient as DICOM into ``out`` (default: the package's sample folder)."""
    from twinrt.dicom.folder import export_case

    base = shared_data_dir()
    if base is None:
        raise MissingInputError("../shared/data is needed to rebuild the sample; set TWINRT_SHARED_DATA")
    src = base / "openkbp" / "validation" / f"{SAMPLE_SOURCE_PATIENT}.npz"
    case = crop_case(load_openkbp(src))
    case.metadata["study_description"] = f"OpenKBP validation {SAMPLE_SOURCE_PATIENT} (cropped)"
    out = Path(out) if out is not None else SAMPLE_DICOM_DIR
    export_case(case, out)
    write_text_atomic(out / "README.txt",
                      f"TwinRT sample patient: OpenKBP validation patient {SAMPLE_SOURCE_PATIENT}, exported to DICOM\n"
                      "by 'twinrt make-sample' (CT cropped to the region holding data; reference-plan dose).\n"
                      "Prescription: 70 Gy to PTV70, 63 Gy to PTV63, 56 Gy to PTV56 in 35 fractions.\n"
                      f"Cite: {OPENKBP_CITATION}\nLicense of the OpenKBP data set: see the OpenKBP repository "
                      "(ababier/open-kbp); CT images from TCIA.\n")
    return out
