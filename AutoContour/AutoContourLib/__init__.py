"""Helpers of the AutoContour module (filled by issue 6).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to AutoContour (its worker process and model handling, STYLE.md section 6) goes here.
"""
