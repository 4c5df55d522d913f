"""TwinRT core: pure-Python radiotherapy planning, twin and toxicity toolkit (research use only).

Never imports slicer, vtk, qt or ctk. Heavy packages (torch, monai, numba) are imported lazily.
"""

__version__ = "0.1.0"

RESEARCH_USE_ONLY = "Research use only, not for clinical decisions."

from twinrt.geometry import Grid, resample_array  # noqa: E402
from twinrt.model import Case, Dose, Image, Plan, Prescription, Structure, StructureType  # noqa: E402

__all__ = ["Grid", "resample_array", "Case", "Dose", "Image", "Plan", "Prescription", "Structure",
           "StructureType", "RESEARCH_USE_ONLY", "__version__"]
