"""The sample patient bundled with TwinRT, for the demo and the always-on tests.

OpenKBP validation patient ``pt_236`` (all ten OpenKBP structures present), converted to DICOM
(CT series, RTSTRUCT, RTDOSE of the reference plan) by ``twinrt make-sample`` with the image
cropped to the region that holds CT data. Citation: :data:`twinrt.data.OPENKBP_CITATION`.
"""

from __future__ import annotations

from pathlib import Path

from twinrt.errors import MissingInputError

#: OpenKBP patient the sample is made from.
SAMPLE_SOURCE_PATIENT = "pt_236"
#: Folder holding the sample's DICOM files (installed with the package).
SAMPLE_DICOM_DIR = Path(__file__).resolve().parent / "data" / "sample" / "OpenKBP_pt_236"


def sample_dicom_dir() -> Path:
    """The sample patient's DICOM folder; :class:`MissingInputError` if the package lacks it."""
    if not SAMPLE_DICOM_DIR.is_dir() or not any(SAMPLE_DICOM_DIR.glob("*.dcm")):
        raise MissingInputError(f"The bundled sample patient is missing from {SAMPLE_DICOM_DIR}; "
                                "reinstall TwinRT or run 'twinrt make-sample' with ../shared/data present",
                                SAMPLE_DICOM_DIR)
    return SAMPLE_DICOM_DIR


def load_sample_case():
    """The sample patient as a :class:`twinrt.model.Case` (imported from its DICOM files)."""
    from twinrt.dicom.folder import import_case

    return import_case(sample_dicom_dir())
