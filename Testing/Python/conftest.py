"""pytest set-up for the Slicer-side tests (module Logic and the cross-module workflow).

Only tests under Testing/Python and <Module>/Testing/Python see this; the core tests in tests/ never
load it, so they run without slicer-core. ``slicer`` is imported inside the fixture, not here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slicer_harness import slicerScene  # noqa: E402,F401  (the fixture)
