"""Root pytest configuration: the whole suite (unit tests and nbval notebooks) runs in fast mode.

Set here, at import time, so that the Jupyter kernels nbval starts inherit it too.
"""

import os

os.environ.setdefault("MINIDIFF_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
