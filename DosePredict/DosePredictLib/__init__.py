"""Helpers of the DosePredict module (filled by issue 5).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to DosePredict (its worker process and model handling, STYLE.md section 6) goes here.
"""
