"""File names and search layers: slugs that cannot escape a directory, layer order, the hook."""

from __future__ import annotations

import os
import string

import pytest

from moe_tune.cache import paths

# device name, slug: the edge case each covers
SLUGS = [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),  # the usual
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "nvidia-h100-80gb-hbm3-mig-1g-10gb"),  # MIG slice
    ("../../etc/passwd", "etc-passwd"),  # path traversal
    ("/", "unknown-device"),  # nothing left
    ("NVIDIA\x00H200", "nvidia-h200"),  # control character
    ("ÄMD Instinct MI300X", "md-instinct-mi300x"),  # non-ASCII is dropped, not transliterated
]


@pytest.mark.parametrize("name, slug", SLUGS)
def test_device_slug(name, slug):
    assert paths.device_slug(name) == slug


def test_random_names_never_escape(rng, tmp_path):
    alphabet = string.printable + "éß/\\.."
    for _ in range(200):
        device = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        version = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        name = paths.file_name(device, version)
        assert os.sep not in name and "/" not in name and "\\" not in name and ".." not in name
        assert paths.is_cache_file_name(name)
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
        assert len(name.encode()) < 255


def test_version_slug_keeps_dots():
    assert paths.file_name("NVIDIA H200", "3.6.0+git1a2b") == "nvidia-h200__triton-3.6.0-git1a2b.json"


def test_lock_and_temp_files_are_not_cache_files():
    assert not paths.is_cache_file_name("nvidia-h200__triton-3.6.0.json.lock")
    assert not paths.is_cache_file_name(".nvidia-h200__triton-3.6.0.json.abc.tmp")
    assert not paths.is_cache_file_name("nvidia-h200__triton-3.6.0.json.corrupt-20260101T000000Z")
    assert not paths.is_cache_file_name("notes.json")


def test_layers_in_order_with_env_and_hook(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE_DIR, raising=False)
    with paths.override_roots(user=tmp_path / "u", shipped=tmp_path / "s"):
        assert [(l.name, l.root) for l in paths.search_layers()] == [("user", tmp_path / "u"), ("shipped", tmp_path / "s")]
        monkeypatch.setenv(paths.ENV_CACHE_DIR, str(tmp_path / "e"))
        assert [l.name for l in paths.search_layers()] == ["env", "user", "shipped"]
        # An explicit path takes the env variable's place, it does not stack on it.
        assert [l.name for l in paths.search_layers(tmp_path / "x")] == ["explicit", "user", "shipped"]
        assert paths.default_store_dir() == tmp_path / "e"
        assert paths.default_store_dir(tmp_path / "x") == tmp_path / "x"
    assert paths.user_cache_dir() != tmp_path / "u"  # the hook is undone on exit


def test_default_user_dir_is_platformdirs_moe_tune(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.user_cache_dir() == tmp_path / "moe-tune"


def test_layer_lists_only_its_device(tmp_path):
    for name in ("nvidia-h100__triton-3.6.0.json", "nvidia-h100__triton-3.5.0.json", "nvidia-h200__triton-3.6.0.json",
                 "nvidia-h100__triton-3.6.0.json.lock", "README.md"):
        (tmp_path / name).write_text("{}")
    layer = paths.Layer("user", tmp_path)
    assert [f.name for f in layer.cache_files("NVIDIA H100")] == ["nvidia-h100__triton-3.5.0.json",
                                                                 "nvidia-h100__triton-3.6.0.json"]
    assert len(layer.cache_files()) == 3
    assert paths.Layer("user", tmp_path / "missing").cache_files() == []
    assert paths.Layer("explicit", tmp_path / "README.md").cache_files() == [tmp_path / "README.md"]


def test_user_dir_without_platformdirs_falls_back_to_xdg(monkeypatch, tmp_path):
    # Images installed with --no-deps may lack platformdirs; the runtime must still find caches.
    import builtins

    from moe_tune.cache import paths

    real_import = builtins.__import__

    def no_platformdirs(name, *args, **kwargs):
        if name == "platformdirs":
            raise ImportError("no platformdirs here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_platformdirs)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(paths, "_overrides", {})  # no test override: the real lookup runs
    assert paths.user_cache_dir() == tmp_path / "moe-tune"


def test_shipped_layer_from_a_source_checkout_not_installed():
    # GPU boxes often run the repository from PYTHONPATH with nothing installed: the resource
    # package does not exist there, and the shipped layer is the checkout's caches/ folder.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = "from moe_tune.cache import paths; print(paths.shipped_root())"
    # -S: no site-packages, so no editable-install finder can map the resource package.
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo, capture_output=True, text=True,
                         env={"PYTHONPATH": str(repo)}, check=True).stdout.strip()
    assert Path(out) == repo / "caches"
