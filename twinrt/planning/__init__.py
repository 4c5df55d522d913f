"""Photon treatment planning: beams, pencil-beam dose engine, fluence optimisation, leaf sequencing.

Coordinates are patient LPS (mm) as everywhere in TwinRT. The beam geometry follows the
matRad/pyRadPlan convention (IEC gantry sense for a head-first-supine patient); see
:mod:`twinrt.planning.beams`.
"""
