"""Helpers of the DosePredict module (issue 5) that are not Logic.

``worker.py`` is the prediction's own process (it never imports slicer) and the npz format it shares
with the Logic; ``TwinRTCommon.process`` starts it, follows its progress and kills its process tree on
cancel; ``slicerRtDoseEngine.py`` offers the prediction in SlicerRT's External Beam Planning. The
MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``.
"""
