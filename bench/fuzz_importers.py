"""Coverage-guided fuzzing of every file importer with atheris (issue 10), bounded in time.

Each target of ``tests/fuzz_targets.py`` (CT series, RTSTRUCT, RTDOSE, RTPLAN, PET series, a whole
DICOM folder, goal files, case timelines and their arrays, model manifests, the toxicity cohort CSV,
the audit log) runs in its own process under libFuzzer (atheris), seeded with TwinRT's own valid
file, with TwinRT's modules instrumented for coverage. A crash is anything but TwinRT's own typed
error (:class:`twinrt.errors.TwinRTError`); libFuzzer stops a target at its first crash (or an input
slower than ``--timeout`` s, or memory above ``--rss-mb``) and the input is copied to
``tests/data/fuzz_regressions/<target>/``, where ``tests/test_fuzz_regressions.py`` replays it
forever after.

Usage (atheris from PyPI: ``.venv/bin/pip install atheris``)::

    .venv/bin/python bench/fuzz_importers.py --seconds 60               # every target, 1 min each
    .venv/bin/python bench/fuzz_importers.py --targets rtstruct rtdose --seconds 300

Ends with ``RESULT {json}``: per target executions, executions per second, coverage (libFuzzer
``cov``), findings, and the totals ``executions`` and ``findings``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _worker(name: str, workdir: Path, libfuzzer_args: list[str]) -> None:
    """Fuzz one target in this process (never returns: libFuzzer exits)."""
    import logging
    import warnings

    import atheris

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=["twinrt"]):
        import twinrt.audit  # noqa: F401
        import twinrt.dicom.ct  # noqa: F401
        import twinrt.dicom.folder  # noqa: F401
        import twinrt.dicom.pet  # noqa: F401
        import twinrt.dicom.rtdose  # noqa: F401
        import twinrt.dicom.rtplan  # noqa: F401
        import twinrt.dicom.rtstruct  # noqa: F401
        import twinrt.dosepredict.weights  # noqa: F401
        import twinrt.planning.evaluation  # noqa: F401
        import twinrt.toxicity.csvio  # noqa: F401
        import twinrt.toxicity.model  # noqa: F401
        import twinrt.twin.timeline  # noqa: F401
    from tests.fuzz_targets import TARGETS

    target = TARGETS[name].setup(workdir / "files")
    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "seed").write_bytes(target.seed)

    def one_input(data: bytes) -> None:
        target.load(data)

    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one_input)
    atheris.Fuzz()


def _stats(text: str) -> dict[str, Optional[float]]:
    def last(pattern: str) -> Optional[float]:
        found = re.findall(pattern, text)
        return float(found[-1]) if found else None

    return {"executions": last(r"stat::number_of_executed_units:\s*(\d+)") or last(r"#(\d+)\s+DONE"),
            "exec_per_s": last(r"exec/s:\s*(\d+)"), "coverage": last(r"cov:\s*(\d+)"),
            "peak_rss_mb": last(r"stat::peak_rss_mb:\s*(\d+)")}


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", help="targets to fuzz (default: all)")
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (s)")
    p.add_argument("--timeout", type=int, default=20, help="an input slower than this (s) is a finding")
    p.add_argument("--rss-mb", type=int, default=4096, help="memory above this (MB) is a finding")
    p.add_argument("--keep", type=Path, default=None, help="where to copy findings (default "
                                                         "tests/data/fuzz_regressions/<target>)")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.worker:
        _worker(args.worker, args.workdir, rest)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: .venv/bin/pip install atheris", file=sys.stderr)
        print("RESULT " + json.dumps({"skipped": "atheris not installed"}))
        return 0
    from tests.fuzz_targets import REGRESSIONS_DIR, TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    keep_root = args.keep or REGRESSIONS_DIR
    rows = {}
    t_all = time.perf_counter()
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
            work = Path(tmp)
            artifacts = work / "artifacts"
            artifacts.mkdir()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(work),
                   f"-max_total_time={args.seconds}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_mb}",
                   f"-artifact_prefix={artifacts}/", "-print_final_stats=1", "-max_len=262144"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  timeout=args.seconds + 600)
            seconds = time.perf_counter() - t0
            log = proc.stdout + proc.stderr
            findings = sorted(a for a in artifacts.iterdir() if a.is_file())
            kept = []
            for a in findings:
                dest = keep_root / name / a.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(a, dest)
                kept.append(str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else str(dest))
            crash = re.findall(r"(?m)^(?:=== Uncaught Python exception: ===\n)?(\w+(?:Error|Exception)[^\n]*)", log)
            row = {**_stats(log), "seconds": round(seconds, 1), "exit_code": proc.returncode,
                   "findings": len(findings), "kept": kept,
                   "first_error": crash[0][:300] if findings and crash else None}
            if proc.returncode != 0 and not findings:
                row["error"] = log[-2000:]
            rows[name] = row
            print(f"{name}: {row['executions']:.0f} executions" if row["executions"] else f"{name}: ? executions",
                  f"in {seconds:.0f} s, cov {row['coverage']}, findings {len(findings)}"
                  + (f" ({row['first_error']})" if row["first_error"] else ""), flush=True)
    result = {"executions": int(sum(r["executions"] or 0 for r in rows.values())),
              "findings": int(sum(r["findings"] for r in rows.values())),
              "seconds_per_target": args.seconds, "targets": rows,
              "seconds": round(time.perf_counter() - t_all, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
