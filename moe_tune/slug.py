"""The one rule that turns a name (a GPU, a Triton version, a model) into part of a file name.

Lower case; every run of other characters than ``[a-z0-9]`` (and ``.`` with ``dots``) becomes one
``-``; no leading or trailing ``-`` or ``.``; runs of dots collapse to one (``..`` could read as a
parent directory to a careless consumer); at most ``MAX_LEN`` characters. The cache's file names
(``nvidia-h200__triton-3.6.0.json``) and the sweep journals' names are built with it, so a name
read from a pack or a config file can never point outside the folder it is written into.
"""

from __future__ import annotations

import re

# Long GPU names ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") fit well under this; it keeps a whole file
# name below the 255-byte limit of common file systems.
MAX_LEN = 96


def slug(text: str, *, dots: bool = False, fallback: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``; ``3.6.0+git1a2b`` (``dots``) →
    ``3.6.0-git1a2b``; ``fallback`` when nothing is left."""
    keep = "a-z0-9." if dots else "a-z0-9"
    text = re.sub(f"[^{keep}]+", "-", text.lower()).strip("-.")
    text = re.sub(r"\.{2,}", ".", text)
    return text[:MAX_LEN].strip("-.") or fallback
