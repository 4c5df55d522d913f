"""The per-patient radiotherapy digital twin over the fractions (issue 7; research use only).

Modules: :mod:`~twinrt.twin.timeline` (the course: planning case + fractions, saved and reloaded),
:mod:`~twinrt.twin.registration` (rigid then deformable registration of a fraction to the planning
anatomy), :mod:`~twinrt.twin.twin` (accumulated dose, BED, EQD2, planned versus delivered DVH, goal
warnings), :mod:`~twinrt.twin.response` (tumour response model, Bayesian calibration, regimen
comparison), :mod:`~twinrt.twin.similar` (similar past cases), :mod:`~twinrt.twin.simulator`
(a documented treatment-course simulator) and :mod:`~twinrt.twin.course_dicom` (a course to and
from DICOM).
"""
