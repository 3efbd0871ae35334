"""Put the repo root (for `import llama`, `import train`, ...) and tests/ (for
`from distributed import run_on_ranks`) on sys.path, whatever pytest's import mode."""

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS_DIR, os.path.dirname(_TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
