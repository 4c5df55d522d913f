"""Every importer survives damaged files with a typed error (issue 10).

For each fuzz target (``tests/fuzz_targets.py``): the seed (TwinRT's own valid file) imports; every
input that fuzzing once crashed (``tests/data/fuzz_regressions/<target>/``, kept by
``bench/fuzz_importers.py``) and a fixed set of 60 mutations of the seed (truncations, bit flips,
inserted and deleted bytes, huge lengths, broken digits and brackets) end either in a successful
import or in one of TwinRT's own errors (:class:`twinrt.errors.TwinRTError`), never in anything
else. No atheris needed. Before the fixes of issue 10 these mutations raised AttributeError,
NotImplementedError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error and OSError
from pydicom, numpy and the standard library in the RTSTRUCT, RTDOSE, RTPLAN, CT, PET, timeline,
goal-file, CSV and audit-log readers.
"""

from __future__ import annotations

import warnings

import pytest

from tests.fuzz_targets import TARGETS, mutations, regression_inputs
from twinrt.errors import DamagedFileError, DicomImportError, TwinRTError, reading


@pytest.mark.parametrize("name", list(TARGETS))
def test_importer_never_crashes_on_damaged_input(name, tmp_path):
    if name == "dose_model_manifest":
        pytest.importorskip("torch")
    target = TARGETS[name].setup(tmp_path / name)
    inputs = [p.read_bytes() for p in regression_inputs(name)] + mutations(target.seed, 60, rng_seed=2024)
    crashes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, data in enumerate(inputs):
            try:
                target.load(data)  # TwinRT's typed errors are swallowed by the target
            except Exception as exc:  # anything else is a crash
                crashes.append(f"input {n} ({len(data)} bytes): {type(exc).__name__}: {str(exc)[:120]}")
    assert not crashes, "\n".join(crashes)


def test_reading_decorator_names_the_file_and_keeps_typed_errors(tmp_path):
    @reading("DICOM RTDOSE file")
    def dicom_reader(path):
        raise AttributeError("'Dataset' object has no attribute 'GridFrameOffsetVector'")

    @reading("goal file (JSON)")
    def text_reader(path):
        b"\xff".decode("utf-8")

    @reading("goal file (JSON)")
    def typed(path):
        raise DicomImportError("already typed", path)

    with pytest.raises(DicomImportError, match="rd.dcm is not a readable DICOM RTDOSE file.*GridFrameOffsetVector"):
        dicom_reader(tmp_path / "rd.dcm")
    with pytest.raises(DamagedFileError, match="goals.json.*UnicodeDecodeError") as info:
        text_reader(tmp_path / "goals.json")
    assert info.value.path == tmp_path / "goals.json" and isinstance(info.value, TwinRTError)
    with pytest.raises(DicomImportError, match="already typed"):
        typed(tmp_path / "x")
