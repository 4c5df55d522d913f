"""Helpers of the ToxicityMonitor module (issue 8).

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio`` and the risk model in
``twinrt.toxicity``; what is specific to ToxicityMonitor lives here: :mod:`ToxicityMonitorLib.riskScene`
writes the risk table (organ x fraction), the risk-over-fractions table and its chart, with the model's
provenance on every node.
"""
