"""Helpers of the AIPlanner module.

The MRML <-> numpy adapter every module shares lives in ``TwinRTCommon.mrmlio``; what is specific
to AIPlanner goes here: ``planRecord`` (plan tables, parameter record and objective-table rows as
plain Python, no ``slicer`` import) and ``slicerRtOptimizer`` (the planner offered in SlicerRT's
External Beam Planning, registered only where SlicerRT is installed; untested here) and
``agentRecord`` (the planning agent's goals table, plan history and attribute names, plain Python).
"""
