"""Beam geometry (matRad/pyRadPlan convention, patient LPS in mm).

A point ``p_bev`` in the beam's eye view (BEV) frame maps to the patient as
``p = isocenter + R @ p_bev`` with ``R = Rcouch(c) @ Rgantry(g)``:

* ``Rgantry = [[cos g, -sin g, 0], [sin g, cos g, 0], [0, 0, 1]]`` (active rotation about +z),
* ``Rcouch = [[cos c, 0, sin c], [0, 1, 0], [-sin c, 0, cos c]]`` (about +y).

In BEV the source sits at ``(0, -SAD, 0)`` and the beam travels along ``+y_bev``; the isocentre
plane is ``y_bev = 0`` with lateral axes ``x_bev`` and ``z_bev``. With couch 0 the source is at
``iso + SAD * (sin g, -cos g, 0)``: gantry 0 enters from anterior (-y), gantry 90 from the
patient's left (+x), the IEC sense for a head-first-supine patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from twinrt.errors import InvalidInputError


def gantry_rotation(gantry_deg: float) -> np.ndarray:
    """3x3 active rotation about +z by the gantry angle (degrees)."""
    g = np.deg2rad(gantry_deg)
    return np.array([[np.cos(g), -np.sin(g), 0.0], [np.sin(g), np.cos(g), 0.0], [0.0, 0.0, 1.0]])


def couch_rotation(couch_deg: float) -> np.ndarray:
    """3x3 active rotation about +y by the couch angle (degrees)."""
    c = np.deg2rad(couch_deg)
    return np.array([[np.cos(c), 0.0, np.sin(c)], [0.0, 1.0, 0.0], [-np.sin(c), 0.0, np.cos(c)]])


@dataclass(frozen=True)
class Beam:
    """One static photon beam.

    :param gantry_deg: gantry angle in degrees (IEC sense, see module docstring).
    :param couch_deg: couch angle in degrees.
    :param isocenter_mm: isocentre in patient LPS (mm).
    :param sad_mm: source-axis distance (mm).
    :param bixel_width_mm: bixel (beamlet) size in the isocentre plane (mm).
    :param energy_mv: nominal energy (MV).
    """

    gantry_deg: float
    couch_deg: float = 0.0
    isocenter_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sad_mm: float = 1000.0
    bixel_width_mm: float = 5.0
    energy_mv: float = 6.0

    def __post_init__(self) -> None:
        iso = np.asarray(self.isocenter_mm, dtype=float).reshape(-1)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise InvalidInputError(f"Beam isocentre must be three finite numbers (mm), got {self.isocenter_mm!r}")
        if not (np.isfinite(self.gantry_deg) and np.isfinite(self.couch_deg)):
            raise InvalidInputError("Beam gantry and couch angles must be finite numbers (degrees)")
        if self.sad_mm <= 0 or self.bixel_width_mm <= 0:
            raise InvalidInputError("Beam SAD and bixel width must be positive (mm)")
        object.__setattr__(self, "isocenter_mm", tuple(float(v) for v in iso))

    @property
    def rotation(self) -> np.ndarray:
        """R = Rcouch @ Rgantry, so that ``p = iso + R @ p_bev``."""
        return couch_rotation(self.couch_deg) @ gantry_rotation(self.gantry_deg)

    @property
    def source_mm(self) -> np.ndarray:
        """Source position in patient LPS (mm)."""
        return np.asarray(self.isocenter_mm) + self.rotation @ np.array([0.0, -self.sad_mm, 0.0])

    @property
    def direction(self) -> np.ndarray:
        """Unit vector of the beam's central axis (source → isocentre) in LPS."""
        return self.rotation @ np.array([0.0, 1.0, 0.0])

    def bev_to_lps(self, p_bev: np.ndarray) -> np.ndarray:
        """Patient LPS (mm) of BEV points ``(..., 3)``."""
        return np.asarray(p_bev, dtype=float) @ self.rotation.T + np.asarray(self.isocenter_mm)

    def lps_to_bev(self, p_lps: np.ndarray) -> np.ndarray:
        """BEV coordinates of patient LPS points ``(..., 3)`` (mm)."""
        return (np.asarray(p_lps, dtype=float) - np.asarray(self.isocenter_mm)) @ self.rotation


@dataclass
class BeamRays:
    """The bixels (rays) of one beam: their centres in the isocentre plane.

    :param beam: the beam.
    :param ray_bev_mm: (n, 3) ray positions ``(x_bev, 0, z_bev)`` in mm, sorted by x_bev then z_bev.
    """

    beam: Beam
    ray_bev_mm: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @property
    def n_rays(self) -> int:
        """Number of rays (bixels) of the beam."""
        return int(self.ray_bev_mm.shape[0])

    @property
    def ray_iso_plane_mm(self) -> np.ndarray:
        """(n, 3) ray positions in the isocentre plane, patient LPS (mm)."""
        return self.beam.bev_to_lps(self.ray_bev_mm)
