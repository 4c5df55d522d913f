"""ToxicityMonitor core (issue 8; research use only): per-fraction organ trajectories → early-warning risk.

Modules: :mod:`~twinrt.toxicity.trajectory` (the data: one :class:`OrganTrajectory` per patient and
organ, and a cohort), :mod:`~twinrt.toxicity.csvio` (the documented CSV layout a clinic can fill),
:mod:`~twinrt.toxicity.features`
(cumulative BED dose-volume features, dosiomics and radiomics per organ and fraction, from the
digital twin), :mod:`~twinrt.toxicity.model` (GRU autoencoder + logistic regression, the LKB NTCP
baseline, leave-one-patient-out evaluation) and :mod:`~twinrt.toxicity.cohort` (a documented cohort
simulator built on the DigitalTwin course simulator).
"""
