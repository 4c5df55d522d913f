"""pytest set-up for DigitalTwin's headless Logic tests: the shared harness in Testing/Python.

The harness (Testing/Python/slicer_harness.py) builds a real slicer-core scene; widgets are not
exercised. ``slicer`` is imported inside the fixture, not when this file loads.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "Testing" / "Python"))

from slicer_harness import slicerScene  # noqa: E402,F401  (the fixture)
