"""Test-session settings shared by the unit tests and the notebooks nbval executes.

Outputs and caches go to a temporary directory (a test run never touches data/ or figures/) that is
removed when the session ends, plots render off-screen, and torch.compile is off except in the test
that checks it (compiling every tiny shape would dominate the suite's time; eager and compiled paths
compute the same function).
"""

import atexit
import os
import shutil
import tempfile

_scratch = tempfile.mkdtemp(prefix="paperlib-tests-")
atexit.register(shutil.rmtree, _scratch, True)
os.environ.setdefault("PAPERLIB_CACHE", os.path.join(_scratch, "cache"))
os.environ.setdefault("PAPERLIB_FIGURES", os.path.join(_scratch, "figures"))
os.environ.setdefault("PAPERLIB_COMPILE", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
