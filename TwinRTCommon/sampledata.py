"""Registers TwinRT's bundled sample patient in Slicer's Sample Data module.

The sample is a local DICOM folder shipped inside ``twinrt`` (``twinrt.sample.sample_dicom_dir()``),
not a download, so the Sample Data entry uses a *custom downloader*: clicking it imports the
folder through the TwinRT case path (:func:`TwinRTCommon.mrmlio.importCaseFolder`), which gives the
CT, segmentation, dose, DVH and subject hierarchy exactly as every module expects them.

All five modules call :func:`registerSampleData` at ``startupCompleted()``; it registers once.
"""

from __future__ import annotations

import logging
from pathlib import Path

#: Sample Data category and entry name shown in the Sample Data module.
SAMPLE_CATEGORY = "TwinRT"
SAMPLE_NAME = "TwinRTSamplePatient"
#: Thumbnail shown on the Sample Data button (installed with TwinRTCommon).
THUMBNAIL_PATH = Path(__file__).resolve().parent / "Resources" / "Icons" / "TwinRTSample.png"

_registered = False


def loadSample(source=None):
    """Custom downloader: import the bundled sample into ``slicer.mrmlScene``.

    :param source: the ``SampleDataSource`` Sample Data passes (unused: the sample is local).
    :return: the created nodes (see :func:`TwinRTCommon.mrmlio.caseToScene`).
    :raises twinrt.errors.MissingInputError: when the installation lacks the sample files.
    """
    import slicer

    from TwinRTCommon import mrmlio
    from twinrt.sample import sample_dicom_dir

    _case, created = mrmlio.importCaseFolder(sample_dicom_dir(), slicer.mrmlScene)
    return created


def registerSampleData() -> bool:
    """Add the TwinRT sample to Sample Data once per session.

    :return: True when this call registered it, False when it was already registered or the
        Sample Data module is not available (e.g. a custom Slicer build without it).
    """
    global _registered
    if _registered:
        return False
    try:
        import SampleData
    except ImportError:
        logging.info("Sample Data module not available; TwinRT sample not registered")
        return False
    from twinrt.sample import SAMPLE_DICOM_DIR, SAMPLE_SOURCE_PATIENT

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(THUMBNAIL_PATH),
        # Informational only: the custom downloader reads the local folder.
        uris=SAMPLE_DICOM_DIR.as_uri(),
        fileNames=f"OpenKBP_{SAMPLE_SOURCE_PATIENT}",
        nodeNames=f"OpenKBP_{SAMPLE_SOURCE_PATIENT}",
        loadFiles=False,
        customDownloader=loadSample,
    )
    _registered = True
    return True
