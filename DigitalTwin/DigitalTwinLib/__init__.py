"""Helpers of the DigitalTwin module (issue 7).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to DigitalTwin lives here: :mod:`DigitalTwinLib.twinScene` writes the twin's outputs (fraction
sequences and their browser, planned versus delivered and tumour tables and charts, the regimen table).
"""
