"""Helpers of the ToxicityMonitor module (filled by issue 8).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to ToxicityMonitor (its worker process and model handling, STYLE.md section 6) goes here.
"""
