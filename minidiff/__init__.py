"""minidiff: diffusion models from first principles, one small module per concept.

Start with ``notebooks/01_forward_process.ipynb``; the lessons in ``lessons/`` derive every
formula that the modules implement.
"""

from minidiff.runtime import budget, device, is_fast, seed_everything
from minidiff.weights import pretrained

__all__ = ["budget", "device", "is_fast", "pretrained", "seed_everything"]
__version__ = "0.1.0"
