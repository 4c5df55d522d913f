"""Slicer-side code shared by the five TwinRT modules: the MRML contract and headless helpers.

* :mod:`TwinRTCommon.mrmlio`: case <-> scene (the contract every module reads and writes).
* :mod:`TwinRTCommon.scene`: a headless slicer-core scene and application stand-ins.
* :mod:`TwinRTCommon.logic`: the case-loading methods every module Logic shares.
* :mod:`TwinRTCommon.widget`: the parameter-node and scene plumbing every module Widget shares.
* :mod:`TwinRTCommon.sampledata`: the bundled sample patient in Slicer's Sample Data module.
* :mod:`TwinRTCommon.process`: starts a module's worker process, follows its progress, cancels it.
* :mod:`TwinRTCommon.workerio`: the worker's line protocol and npz helpers (numpy only, no slicer;
  the worker processes import it too).
* :mod:`TwinRTCommon.writescene`: ``python -m TwinRTCommon.writescene --dicom DIR --mrb OUT.mrb``.
* :mod:`TwinRTCommon.testing`: tiny synthetic cases and the self-tests every module shares.

Unlike the core ``twinrt`` this package imports ``slicer``; submodules are imported on demand so
that ``import TwinRTCommon`` itself stays cheap.
"""
