"""Atomic writes and cancel tokens."""

import pytest

from twinrt.io_utils import atomic_dir, atomic_path, write_text_atomic
from twinrt.progress import CancelledError, CancelToken, report


def test_atomic_path_keeps_previous_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path):
    target = tmp_path / "dicom"
    with atomic_dir(target) as tmp:
        (tmp / "a.dcm").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "b.dcm").write_text("2")
            raise ValueError("bad input")
    assert sorted(p.name for p in target.iterdir()) == ["a.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom"]
    with atomic_dir(target) as tmp:
        (tmp / "c.dcm").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.dcm"]


def test_cancel_token_and_report():
    seen = []
    tok = CancelToken()
    report(lambda f, t: seen.append((f, t)), 1.5, "x", tok)
    assert seen == [(1.0, "x")]
    tok.cancel()
    with pytest.raises(CancelledError):
        report(None, 0.5, "y", tok)
