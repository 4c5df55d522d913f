"""Photon machine data for the SVD pencil-beam model (matRad/pyRadPlan ``photons_Generic``).

The bundled ``data/photons_generic_6mv.npz`` is matRad's generic 6 MV machine as shipped with
pyRadPlan 0.5.0 (BSD-3-Clause, see ``data/NOTICE_matRad_pyRadPlan_BSD3.txt``). Its kernels are the
three singular-value-decomposed lateral kernels of Bortfeld, Schlegel and Rhein, "Decomposition of
pencil beam kernels for fast dose calculations in three-dimensional treatment planning", Med. Phys.
20(2), 1993, tabulated in 1/mm² at radii 0..179.5 mm (0.5 mm steps) for SSD 500..1000 mm (1 mm
steps). The depth-dose of component ``c`` is ``β_c/(β_c − m)·(e^(−m·d) − e^(−β_c·d))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from twinrt.errors import InvalidInputError, MissingInputError

logger = logging.getLogger(__name__)

#: The bundled generic 6 MV machine.
GENERIC_6MV_PATH = Path(__file__).resolve().parent / "data" / "photons_generic_6mv.npz"


@dataclass(frozen=True)
class PhotonMachine:
    """A photon machine for the SVD pencil beam.

    :param energy_mv: nominal energy (MV).
    :param sad_mm: source-axis distance (mm).
    :param scd_mm: source-collimator distance (mm); informational.
    :param penumbra_fwhm_mm: FWHM (mm, at the isocentre) of the Gaussian source/penumbra blur.
    :param m_per_mm: primary attenuation coefficient m (1/mm) of the depth-dose model.
    :param betas_per_mm: (n_components,) β_c (1/mm).
    :param kernel_ssd_mm: (n_ssd,) SSDs (mm) at which kernels are tabulated, ascending.
    :param kernel_radius_mm: (n_r,) radii (mm) of the kernel samples, ascending from 0.
    :param kernels: (n_ssd, n_components, n_r) lateral kernels (1/mm²).
    :param primary_fluence: (n, 2) radius (mm) and relative primary fluence; unused by default
        (pyRadPlan applies it only with ``use_custom_primary_photon_fluence``).
    :param source: provenance text.
    """

    energy_mv: float
    sad_mm: float
    scd_mm: float
    penumbra_fwhm_mm: float
    m_per_mm: float
    betas_per_mm: np.ndarray
    kernel_ssd_mm: np.ndarray
    kernel_radius_mm: np.ndarray
    kernels: np.ndarray
    primary_fluence: np.ndarray
    source: str = ""

    @property
    def n_components(self) -> int:
        """Number of SVD kernel components."""
        return int(self.betas_per_mm.shape[0])

    def kernel_index_for_ssd(self, ssd_mm: float) -> int:
        """Index of the tabulated SSD nearest to ``ssd_mm`` (pyRadPlan ``get_kernels_at_ssd``).

        An SSD outside the table uses the nearest end and logs a warning, as pyRadPlan does.
        """
        if not np.isfinite(ssd_mm):
            raise InvalidInputError(f"SSD must be a finite distance (mm), got {ssd_mm!r}")
        if ssd_mm < self.kernel_ssd_mm[0] or ssd_mm > self.kernel_ssd_mm[-1]:
            logger.warning("SSD %.1f mm is outside the machine's kernel range %.0f-%.0f mm; using the nearest",
                           ssd_mm, self.kernel_ssd_mm[0], self.kernel_ssd_mm[-1])
        return int(np.argmin(np.abs(self.kernel_ssd_mm - ssd_mm)))

    def kernels_at_ssd(self, ssd_mm: float) -> np.ndarray:
        """(n_components, n_r) lateral kernels (1/mm²) at the tabulated SSD nearest ``ssd_mm``."""
        return self.kernels[self.kernel_index_for_ssd(ssd_mm)]

    def depth_dose(self, depth_mm: np.ndarray) -> np.ndarray:
        """(n_components, ...) depth factors ``β_c/(β_c − m)·(e^(−m·d) − e^(−β_c·d))``.

        :param depth_mm: radiological (water-equivalent) depth (mm).
        """
        d = np.asarray(depth_mm, dtype=float)
        b = self.betas_per_mm.reshape((-1,) + (1,) * d.ndim)
        m = self.m_per_mm
        return b / (b - m) * (np.exp(-m * d) - np.exp(-b * d))


def load_machine(path: str | Path | None = None) -> PhotonMachine:
    """Load a photon machine ``.npz`` (default: the bundled generic 6 MV machine).

    :param path: machine file with the keys of ``photons_generic_6mv.npz``.
    """
    return _load_machine_cached(str(Path(path) if path is not None else GENERIC_6MV_PATH))


@lru_cache(maxsize=4)
def _load_machine_cached(path: str) -> PhotonMachine:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"Photon machine file not found: {p}", p)
    with np.load(p, allow_pickle=False) as d:
        keys = ("energy_mv", "sad_mm", "scd_mm", "penumbra_fwhm_at_iso_mm", "m_per_mm", "betas_per_mm",
                "kernel_ssd_mm", "kernel_radius_mm", "kernels", "primary_fluence")
        missing = [k for k in keys if k not in d.files]
        if missing:
            raise InvalidInputError(f"Photon machine file {p} lacks {', '.join(missing)}")
        kernels = np.asarray(d["kernels"], dtype=np.float64)
        machine = PhotonMachine(
            energy_mv=float(d["energy_mv"]), sad_mm=float(d["sad_mm"]), scd_mm=float(d["scd_mm"]),
            penumbra_fwhm_mm=float(d["penumbra_fwhm_at_iso_mm"]), m_per_mm=float(d["m_per_mm"]),
            betas_per_mm=np.asarray(d["betas_per_mm"], dtype=np.float64),
            kernel_ssd_mm=np.asarray(d["kernel_ssd_mm"], dtype=np.float64),
            kernel_radius_mm=np.asarray(d["kernel_radius_mm"], dtype=np.float64), kernels=kernels,
            primary_fluence=np.asarray(d["primary_fluence"], dtype=np.float64),
            source=str(d["source"]) if "source" in d.files else "")
    if kernels.shape != (machine.kernel_ssd_mm.size, machine.n_components, machine.kernel_radius_mm.size):
        raise InvalidInputError(f"Photon machine file {p}: kernels have shape {kernels.shape}, which does not "
                                "match the SSD, component and radius axes")
    for arr in (machine.betas_per_mm, machine.kernel_ssd_mm, machine.kernel_radius_mm, machine.kernels):
        arr.setflags(write=False)
    return machine


def _convolve_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2D linear convolution by FFT (``scipy.fft``; lighter to import than scipy.signal)."""
    from scipy import fft

    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    fast = tuple(fft.next_fast_len(n, real=True) for n in shape)
    out = fft.irfft2(fft.rfft2(a, fast) * fft.rfft2(b, fast), fast)
    return out[: shape[0], : shape[1]]


def lateral_kernel_table(machine: PhotonMachine, ssd_mm: float, bixel_width_mm: float, half_width_mm: float,
                         resolution_mm: float = 0.5) -> tuple[np.ndarray, float]:
    """The bixel's lateral dose profiles: square fluence ⊗ Gaussian penumbra ⊗ kernel_c, in the iso plane.

    This is matRad's/pyRadPlan's ``int_conv_resolution`` construction (``_svdpb.py``
    ``_init_beam``/``_get_kernel_interpolators``): a uniform ``bixel_width_mm`` square, blurred by
    a Gaussian of the machine's penumbra FWHM (cut at 5 σ), convolved with each SVD kernel (kernel
    values × resolution², so the discrete sum approximates the integral). Unlike pyRadPlan, whose
    even-sized grids centre the square 0.25 mm off the ray, every grid here is odd-sized and
    symmetric, with half-weight samples on the bixel edges, so the profile is centred on the ray.

    :param ssd_mm: SSD (mm) that selects the tabulated kernel (nearest).
    :param bixel_width_mm: bixel side in the isocentre plane (mm).
    :param half_width_mm: the table covers lateral offsets ``-half_width_mm..+half_width_mm``.
    :param resolution_mm: sampling step (mm) of the convolution and of the returned table.
    :return: ``(table, step_mm)``: float32 table (n, n, n_components) on the symmetric grid
        ``step_mm·(-(n-1)/2 .. (n-1)/2)``; axis 0 is the x_bev offset and axis 1 the z_bev offset
        (the profile is symmetric in both). Units: 1/mm² × mm² = dimensionless fluence-kernel product.
    """
    h = float(resolution_mm)
    if h <= 0 or bixel_width_mm <= 0 or half_width_mm <= 0:
        raise InvalidInputError("Bixel width, table half-width and resolution must be positive (mm)")
    kernels = machine.kernels_at_ssd(ssd_mm)

    # Square fluence: the weight of a sample is the fraction of its cell inside the bixel, so the
    # total is exactly the bixel area for any width/resolution ratio.
    n_f = int(np.ceil(bixel_width_mm / (2 * h)))
    x = h * np.arange(-n_f, n_f + 1)
    overlap = np.clip(np.minimum(x + h / 2, bixel_width_mm / 2) - np.maximum(x - h / 2, -bixel_width_mm / 2), 0, h) / h
    fluence = np.outer(overlap, overlap)

    # Gaussian penumbra, normalised like pyRadPlan (h²/(2πσ²) e^(-r²/2σ²)) and cut at 5 σ.
    sigma = machine.penumbra_fwhm_mm / np.sqrt(8 * np.log(2))
    n_g = int(np.ceil(5 * sigma / h))
    g = h * np.arange(-n_g, n_g + 1)
    gauss = h * h / (2 * np.pi * sigma**2) * np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sigma**2))
    blurred = _convolve_full(fluence, gauss)          # half-size n_f + n_g
    n_b = n_f + n_g

    # Only the kernel out to the table edge plus the blurred bixel's reach can contribute, which
    # keeps the FFT small when the lateral cut-off (50 mm) is far below the kernel range (179.5 mm).
    n_out = int(np.ceil(half_width_mm / h))
    r_max = machine.kernel_radius_mm[-1]
    n_k = int(min(np.ceil(r_max / h), n_out + np.ceil(np.sqrt(2) * n_b) + 2))
    k = h * np.arange(-n_k, n_k + 1)
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    table = np.empty((2 * n_out + 1, 2 * n_out + 1, machine.n_components), dtype=np.float32)
    for c in range(machine.n_components):
        kern = h * h * np.interp(r, machine.kernel_radius_mm, kernels[c], right=0.0)
        conv = _convolve_full(blurred, kern)             # centred at n_b + n_k
        centre = n_b + n_k
        lo, hi = centre - n_out, centre + n_out + 1
        if lo < 0:
            # Table wider than kernel + bixel: pad with zeros (no dose that far out).
            padded = np.zeros((2 * n_out + 1,) * 2)
            off = -lo
            padded[off:off + conv.shape[0], off:off + conv.shape[1]] = conv
            table[..., c] = padded
        else:
            table[..., c] = conv[lo:hi, lo:hi]
    return table, h
