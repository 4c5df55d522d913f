"""Helpers of the AutoContour module (issue 6) that are not Logic.

``worker.py`` is the organ-at-risk network's own process (it never imports slicer) and the npz format
it shares with the Logic; ``TwinRTCommon.process`` starts it, follows its progress and kills its
process tree on cancel. The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``.
"""
