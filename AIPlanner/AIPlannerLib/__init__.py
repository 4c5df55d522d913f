"""Helpers of the AIPlanner module.

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to AIPlanner goes here: ``planRecord`` (plan tables, parameter record and objective-table rows as
plain Python, no ``slicer`` import) and ``slicerRtOptimizer`` (the planner offered in SlicerRT's
External Beam Planning, registered only where SlicerRT is installed; untested here). The planning
agent of issue 4 will add its own helpers.
"""
