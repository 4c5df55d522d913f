"""Start a module's worker, follow its ``PROGRESS`` lines, turn its failures into typed errors, cancel it.

One launcher for every module whose stage runs in a worker process (DosePredict's dose prediction,
AutoContour's organ-at-risk network): the module passes its worker script and the arguments; the
line protocol and exit codes the two sides share are in :mod:`TwinRTCommon.workerio`.

How the process is started and stopped depends on what is available, because a cancel must stop
the *whole process tree*: inside Slicer the command is ``PythonSlicer worker.py``, and PythonSlicer
is a launcher whose child (python-real) does the work, so killing only the started process would
leave the computation running ("proc.kill() does not work, that would only stop the launcher",
lassoan/SlicerMONAIAuto3DSeg: MONAIAuto3DSegLib/process.py).

* **psutil importable** (Slicer, once a module's ``Resources/requirements.txt`` installed it, as
  DosePredict's Apply does): the worker is
  started with ``slicer.util.launchConsoleProcess`` (Slicer's startup environment inside Slicer,
  the current one headless), and a cancel kills ``psutil.Process(pid).children(recursive=True)``
  and then the process itself.
* **no psutil** (the headless test environment, or Slicer before the requirements are installed):
  ``launchConsoleProcess`` cannot start a new process group, so the worker is started with
  ``subprocess.Popen(start_new_session=True)`` (POSIX; on Windows ``CREATE_NEW_PROCESS_GROUP``)
  and a cancel kills the group with ``os.killpg`` (on Windows ``taskkill /T /F``). Slicer itself
  is never in that group.

The Logic's call is synchronous, as AIPlanner's in-process planning is: :meth:`WorkerProcess.run`
reads the worker's output in a thread and, on the calling thread, calls ``progress(fraction, text)``
for every ``PROGRESS`` line *and* at least every :attr:`WorkerProcess.heartbeatSeconds` while the
worker is silent (loading torch takes seconds). A Widget that pumps Qt events in its progress
callback therefore stays responsive and sees the Cancel click, which sets the
:class:`twinrt.progress.CancelToken`; the next heartbeat kills the tree and raises
:class:`twinrt.progress.CancelledError`. No MRML or Qt call happens off the calling thread.

Nothing here imports ``slicer`` at module level, so the module can be imported (and tested) anywhere.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from TwinRTCommon.workerio import EXIT_INPUT_ERROR, EXIT_OK, parseLine
from twinrt.errors import TwinRTError

#: Output lines kept for the error message of a crashed worker.
TAIL_LINES = 20


class WorkerFailedError(TwinRTError, RuntimeError):
    """The worker crashed or ended without a result (a bug or the machine, not the input)."""


def psutilModule():
    """``psutil`` when it is importable, else None (it is not bundled with Slicer)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _inRealSlicer() -> bool:
    slicer = sys.modules.get("slicer")
    app = getattr(slicer, "app", None) if slicer is not None else None
    # The headless harness's stand-in application has no startupEnvironment.
    return app is not None and hasattr(app, "startupEnvironment")


def pythonExecutable() -> str:
    """``PythonSlicer`` inside Slicer (it sets up Slicer's Python environment), else ``sys.executable``."""
    if _inRealSlicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def coreDirectory() -> Path:
    """The folder holding the ``twinrt`` and ``TwinRTCommon`` packages this process uses (the
    repository, or Slicer's qt-scripted-modules folder where the extension installs both)."""
    import twinrt

    return Path(twinrt.__file__).resolve().parent.parent


def workerCommand(script: str | os.PathLike, arguments: list[str]) -> list[str]:
    """The command line that runs the worker ``script`` with ``arguments``.

    ``--core-dir`` is added when missing, so that the worker imports the same twinrt and
    TwinRTCommon as this process.

    :param script: the worker script, e.g. ``DosePredictLib/worker.py``.
    :param arguments: its command-line arguments.
    """
    arguments = [str(a) for a in arguments]
    if "--core-dir" not in arguments and not any(a.startswith("--core-dir=") for a in arguments):
        arguments += ["--core-dir", str(coreDirectory())]
    return [pythonExecutable(), str(Path(script).resolve()), *arguments]


def workerEnvironment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The worker's environment: Slicer's startup environment inside Slicer, else this process's.

    :param extra: variables to add or replace.
    """
    if _inRealSlicer():
        import slicer

        environment = slicer.util.startupEnvironment()
    else:
        environment = dict(os.environ)
    # Unbuffered, so PROGRESS lines arrive while the worker runs and not when it exits.
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(extra or {})
    return environment


def typedError(typeName: str, message: str) -> Exception:
    """The exception of a worker's ``ERRORTYPE``/``ERROR`` lines: the same TwinRT class where there is one."""
    from twinrt import errors
    from twinrt.dosepredict.weights import WeightsIntegrityError

    known = {cls.__name__: cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.TwinRTError)}
    known[WeightsIntegrityError.__name__] = WeightsIntegrityError
    cls = known.get(typeName, errors.InvalidInputError)
    try:
        return cls(message)
    except TypeError:  # a class with another signature: keep the message, lose the type
        return errors.InvalidInputError(message)


class WorkerProcess:
    """One run of a worker command (see the module docstring).

    :param command: the command line (:func:`workerCommand`).
    :param environment: variables added to the worker's environment (:func:`workerEnvironment`).
    :param logCallback: ``logCallback(line)`` for every output line that is not a PROGRESS line.
    :param useSlicerLauncher: start with ``slicer.util.launchConsoleProcess``; None (default) does
        so exactly when psutil is importable, because only psutil can then kill the tree.
    :param label: what the worker computes (``"dose prediction"``), for the log and the messages.
    """

    #: Longest silence (seconds) between two progress calls while the worker runs.
    heartbeatSeconds = 0.1

    def __init__(self, command: list[str], environment: Optional[dict[str, str]] = None,
                 logCallback: Optional[Callable[[str], None]] = None, useSlicerLauncher: Optional[bool] = None,
                 label: str = "worker"):
        self.command = [str(c) for c in command]
        self.label = str(label) or "worker"
        self.environment = environment
        self.logCallback = logCallback
        self.useSlicerLauncher = psutilModule() is not None if useSlicerLauncher is None else useSlicerLauncher
        #: The ``subprocess.Popen`` once started.
        self.proc = None
        #: Every output line, in order.
        self.lines: list[str] = []
        self._ownGroup = False

    # ---------------------------------------------------------------------------------- start/kill
    def start(self):
        """Start the process; returns the ``subprocess.Popen``."""
        logging.debug("TwinRT %s: starting %s", self.label, self.command)
        if self.useSlicerLauncher:
            import slicer.util

            real = _inRealSlicer()
            # In Slicer, PythonSlicer needs the startup environment (it sets up Slicer's own);
            # launchConsoleProcess adds updateEnvironment to it. blocking=True only means "return
            # the Popen without starting Qt's polling": this class reads the output itself.
            extra = {"PYTHONUNBUFFERED": "1", **(self.environment or {})}
            self.proc = slicer.util.launchConsoleProcess(self.command, useStartupEnvironment=real,
                                                         updateEnvironment=extra, blocking=True)
            self._ownGroup = False
        else:
            kwargs = {}
            if os.name == "nt":
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
            else:
                kwargs["start_new_session"] = True  # its own process group: killpg stops the tree
            # Both ends agree on UTF-8 here (the worker's messages may hold characters such as "³").
            environment = workerEnvironment({"PYTHONIOENCODING": "utf-8", **(self.environment or {})})
            self.proc = subprocess.Popen(self.command, env=environment,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1, **kwargs)
            self._ownGroup = True
        return self.proc

    def kill(self) -> None:
        """Kill the process and everything it started; waits until it is gone."""
        proc = self.proc
        if proc is None:
            return
        psutil = psutilModule()
        if self._ownGroup and os.name != "nt":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # already gone
        elif psutil is not None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            if proc.poll() is None:
                proc.kill()
        elif os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        else:
            proc.kill()  # no psutil and no group of its own: the best that can be done
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logging.warning("TwinRT %s: worker %s did not stop within 10 s of being killed", self.label, proc.pid)

    # -------------------------------------------------------------------------------------- run
    def _readOutput(self, lines: queue.Queue) -> None:
        try:
            while True:
                try:
                    line = self.proc.stdout.readline()
                except UnicodeDecodeError:
                    # launchConsoleProcess decodes with the locale's encoding; a line it cannot decode
                    # is dropped, and reading goes on so the pipe never fills up and blocks the worker.
                    continue
                if not line:
                    break
                lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass  # the pipe closed under us (killed)
        finally:
            lines.put(None)

    def run(self, progress: Optional[Callable[[float, str], None]] = None, cancel=None) -> list[str]:
        """Start the worker and wait for it, reporting progress; see the module docstring.

        :param progress: ``progress(fraction, text)``, called for each PROGRESS line and at least
            every :attr:`heartbeatSeconds`, always on the calling thread.
        :param cancel: a :class:`twinrt.progress.CancelToken`; when set, the tree is killed.
        :return: the worker's output lines.
        :raises CancelledError: cancelled (before the start or while running).
        :raises TwinRTError: the worker's typed error (exit code 2), with its class and message.
        :raises WorkerFailedError: any other failure, with the end of the worker's output.
        """
        from twinrt.progress import CancelledError

        if cancel is not None and cancel.cancelled:
            raise CancelledError(self._cancelledMessage())
        self.start()
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=self._readOutput, args=(lines,), name=f"TwinRTWorkerOutput {self.label}",
                                  daemon=True)
        reader.start()
        fraction, text = 0.0, "Starting the worker"
        errorType, errorMessage = "", ""
        finished = False
        try:
            while True:
                try:
                    line = lines.get(timeout=self.heartbeatSeconds)
                except queue.Empty:
                    line = ""
                if cancel is not None and cancel.cancelled:
                    raise CancelledError(self._cancelledMessage())
                if line is None:
                    break  # end of output: the worker exited
                if line:
                    self.lines.append(line)
                    kind, value, rest = parseLine(line)
                    if kind == "progress":
                        fraction, text = max(fraction, float(value)), rest
                    elif kind == "error":
                        errorMessage = rest
                    elif kind == "errortype":
                        errorType = rest
                    if kind != "progress" and self.logCallback is not None:
                        self.logCallback(line)
                if progress is not None:
                    progress(fraction, text)
            self.proc.wait()
            finished = True
        finally:
            if not finished:
                # Cancelled, or the progress callback raised: nothing may keep running.
                self.kill()
            reader.join(timeout=5)
        return self._checkExit(errorType, errorMessage)

    def _cancelledMessage(self) -> str:
        return f"{self.label[:1].upper()}{self.label[1:]} cancelled by the user"

    def _checkExit(self, errorType: str, errorMessage: str) -> list[str]:
        code = self.proc.returncode
        if code == EXIT_OK:
            return self.lines
        if code == EXIT_INPUT_ERROR and errorMessage:
            raise typedError(errorType, errorMessage)
        tail = "\n".join(self.lines[-TAIL_LINES:])
        if code is not None and code < 0:
            reason = f"was killed by signal {-code} (out of memory?)"
        else:
            reason = f"failed with exit code {code}"
        summary = f": {errorMessage}" if errorMessage else ""
        raise WorkerFailedError(f"The {self.label} process {reason}{summary}. See the log for details; "
                                f"last output:\n{tail}")


def runWorker(script: str | os.PathLike, arguments: list[str], progress=None, cancel=None, logCallback=None,
              environment: Optional[dict[str, str]] = None, label: str = "worker") -> list[str]:
    """Run the worker ``script`` with ``arguments`` (see :meth:`WorkerProcess.run`).

    :param script: the worker script (``<Module>Lib/worker.py``).
    :param arguments: the worker's command-line arguments (``--input``, ``--output``...).
    :param progress: ``progress(fraction, text)``, called at least every 0.1 s on the calling thread.
    :param cancel: a :class:`twinrt.progress.CancelToken`; when set, the worker's tree is killed.
    :param logCallback: ``logCallback(line)`` for every output line that is not a PROGRESS line.
    :param environment: variables added to the worker's environment (:func:`workerEnvironment`).
    :param label: what the worker computes (``"dose prediction"``), for the log and the messages.
    :return: the worker's output lines.
    """
    worker = WorkerProcess(workerCommand(script, arguments), environment, logCallback, label=label)
    return worker.run(progress, cancel)
