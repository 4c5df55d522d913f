"""Helpers of the AIPlanner module (filled by issue 3 and 4).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to AIPlanner (its worker process and model handling, STYLE.md section 6) goes here.
"""
