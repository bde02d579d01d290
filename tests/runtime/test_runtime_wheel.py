"""The shipped layer from a real wheel: build one (with a sample cache in ``caches/``), check the
cache travels as ``moe_tune/shipped_caches/*.json``, and resolve a config from it with the wheel
as a zip on ``sys.path`` — a non-editable install, and ``importlib.resources`` handing back a
zip Traversable instead of a Path."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from moe_tune.cache import CacheFile
from moe_tune.cache.software import Software
from moe_tune.cache.software import kernel_source_hash, triton_version
from moe_tune.cache.testing import random_measurement
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.problem import KernelConfig, MoeShape

REPO = Path(__file__).resolve().parents[2]
SHAPE = MoeShape(E=4, H=64, I=32, topk=2)
SHIPPED = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)

# Runs with -I (no PYTHONPATH, no user site); the zip comes first on sys.path, so the package
# is imported from it and not through the development install's finder (asserted below).
PROBE = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import moe_tune, moe_tune.runtime as rt
from moe_tune.cache import paths
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.problem import MoeShape
with paths.override_roots(user=sys.argv[2]):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = rt.explain(MoeShape(4, 64, 32, 2).problems("float32")[0], 20, INTERPRETER_DEVICE)
print(json.dumps({"file": moe_tune.__file__, "source": r.source, "config": r.config.to_dict(), "bucket": r.bucket,
                  "warnings": [str(w.message) for w in seen]}))
"""


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build a wheel")
def test_shipped_cache_travels_in_the_wheel(tmp_path, rng):
    tree = tmp_path / "tree"
    for name in ("moe_tune", "caches", "configs"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.json.lock"))
    shutil.copy(REPO / "pyproject.toml", tree)
    readme = REPO / "README.md"
    (tree / "README.md").write_text(readme.read_text() if readme.exists() else "moe-tune\n")
    software = Software(triton_version(), "2.13.0", None, "0.1.0", kernel_source_hash())
    cache = CacheFile.new(INTERPRETER_DEVICE, software, command="test")
    for problem in SHAPE.problems("float32"):
        for tokens in (16, 4096):
            cache.add(problem, tokens, SHIPPED, random_measurement(rng))
    (tree / "caches" / cache.name).write_text(cache.dumps())

    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(tree),
                    "-w", str(out)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = out.glob("moe_tune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"moe_tune/shipped_caches/{cache.name}" in names
    assert {"moe_tune/shipped_caches/__init__.py", "moe_tune/runtime/__init__.py", "moe_tune/cache/store.py",
            "moe_tune/kernels/grouped_mm.py"} <= names

    probe = subprocess.run([sys.executable, "-I", "-c", PROBE, str(wheel), str(tmp_path / "no-user-cache")],
                           check=True, capture_output=True, text=True, cwd=tmp_path)
    found = json.loads(probe.stdout)
    assert found["file"].startswith(str(wheel))
    assert (found["source"], found["bucket"]) == ("shipped", 16)
    assert found["config"] == SHIPPED.to_dict()
    assert found["warnings"] == []  # same Triton, same kernel sources
