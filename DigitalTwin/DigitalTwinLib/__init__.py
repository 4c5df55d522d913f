"""Helpers of the DigitalTwin module (filled by issue 7).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to DigitalTwin (its worker process and model handling, STYLE.md section 6) goes here.
"""
