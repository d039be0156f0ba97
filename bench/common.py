"""What the benchmark scripts share. Import it first: it puts the checkout on sys.path.

    import common  # bench/ is the script's folder, so it is on sys.path
    common.use_one_device()
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `import vlpre` from a checkout that is not pip-installed

from vlpre.methods.tables import use_one_device  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
