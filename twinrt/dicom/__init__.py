"""DICOM and DICOM-RT import/export for TwinRT (pydicom only; no Slicer).

Public functions, imported lazily on first use so that ``import twinrt.dicom`` stays cheap:

* :func:`read_ct_series`, :func:`write_ct_series` (``twinrt.dicom.ct``)
* :func:`read_pet_series`, :func:`write_pet_series` (``twinrt.dicom.pet``, SUVbw)
* :func:`read_rtstruct`, :func:`write_rtstruct` (``twinrt.dicom.rtstruct``)
* :func:`read_rtdose`, :func:`write_rtdose` (``twinrt.dicom.rtdose``)
* :func:`read_rtplan`, :func:`write_rtplan` (``twinrt.dicom.rtplan``)
* :func:`import_case`, :func:`export_case` (``twinrt.dicom.folder``)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_ct_series": "ct", "write_ct_series": "ct",
    "read_pet_series": "pet", "write_pet_series": "pet",
    "read_rtstruct": "rtstruct", "write_rtstruct": "rtstruct",
    "read_rtdose": "rtdose", "write_rtdose": "rtdose",
    "read_rtplan": "rtplan", "write_rtplan": "rtplan",
    "import_case": "folder", "export_case": "folder",
    "DicomContext": "common", "CtReference": "common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: the submodule is imported the first time one of its names is used.
    if name in _EXPORTS:
        module = importlib.import_module(f"twinrt.dicom.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'twinrt.dicom' has no attribute '{name}'")
