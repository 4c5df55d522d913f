"""Every importer survives damaged files with a typed error (issue 10).

For each fuzz target (``tests/fuzz_targets.py``): the seed (TwinRT's own valid file) imports; every
input that once crashed an importer (``tests/data/fuzz_regressions/<target>/``: ``mutation-*`` files
found by these mutations before the fixes, ``crash-*``/``timeout-*`` files kept by
``bench/fuzz_importers.py``) and a fixed set of 60 mutations of the seed (truncations, bit flips,
inserted and deleted bytes, huge lengths, broken digits and brackets) end either in a successful
import or in one of TwinRT's own errors (:class:`twinrt.errors.TwinRTError`) whose message names the
file, never in anything else. No atheris needed. Before the fixes of issue 10 these mutations raised AttributeError,
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
    if name in ("dose_model_manifest", "toxicity_manifest"):
        pytest.importorskip("torch")
    target = TARGETS[name].setup(tmp_path / name)
    kept = regression_inputs(name)
    inputs = [p.read_bytes() for p in kept] + mutations(target.seed, 60, rng_seed=2024)
    crashes, unnamed, refused = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n, data in enumerate(inputs):
            try:
                error = target.load(data)  # TwinRT's typed error, or None when the input imported
            except Exception as exc:  # anything else is a crash
                crashes.append(f"input {n} ({len(data)} bytes): {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if error is not None:
                refused += 1
                # The message names the file (or its folder), so the user knows what to fix.
                if target.path.name not in str(error) and target.path.parent.name not in str(error):
                    unnamed.append(f"input {n}: {type(error).__name__}: {str(error)[:120]}")
    assert not crashes, "\n".join(crashes)
    assert not unnamed, "errors that do not name the file:\n" + "\n".join(unnamed)
    assert refused >= len(kept)  # every kept crash input is now refused with a typed error
    assert refused > 0


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
