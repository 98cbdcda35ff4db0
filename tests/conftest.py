import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The package is installed in editable mode by the setup script; this keeps a plain
# `pytest` from a checkout working too.
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
