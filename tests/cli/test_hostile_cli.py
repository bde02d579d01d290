"""Hostile input and the CLI polish of issue #15, through the real entry point: every command on
every defect class gives one line on stderr and exit 2 (``doctor`` reports and exits 0), never a
traceback or a block; help keeps its ``[default: …]`` notes and shows flags as flags; usage errors
are one line; ``install --dry-run`` fails where ``install`` fails; a merge of two devices that
share a file name says what differs; ``verify`` without a GPU names itself."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest

from moe_tune.cache import CacheFile, CacheStore, Pack
from moe_tune.cache.fields import MAX_FILE_BYTES
from moe_tune.cache.pack import canonical_sha256
from moe_tune.cache.software import Software
from moe_tune.cache.testing import H100, random_cache_file
from moe_tune.cli.app import COMMAND_MODULES

SOFTWARE = Software(triton="3.6.0", torch="2.11.0", cuda="13.0", moe_tune="0.1.0", kernel_hash="0123456789abcdef")


@pytest.fixture(autouse=True)
def no_hang():
    """A command that blocks (on a FIFO, say) fails the test instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError("the command blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_line_error(result) -> str:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), result.stderr
    return lines[0]


def _bucket(doc: dict) -> dict:
    return next(iter(doc["entries"].values()))["buckets"][0]


def _set(doc: dict, path: tuple, literal: str) -> str:
    target = doc
    for key in path[:-1]:
        target = target[key] if key != "bucket" else _bucket(doc)
    target[path[-1]] = "__LITERAL__"
    return json.dumps(doc).replace('"__LITERAL__"', literal)


def _hostile_files(tmp_path, rng) -> dict:
    """name → a path holding that defect class (a cache file, or a pack where the defect hid in one)."""
    good = random_cache_file(rng, software=SOFTWARE).to_json

    def naive_pack():
        # Timestamps without a zone used to pass validation and crash install, merge and the dry run.
        cache = random_cache_file(rng, software=SOFTWARE)
        doc = Pack([cache]).to_json()
        doc["caches"][0]["provenance"]["created"] = "2026-11-27T13:00:00"
        doc["sha256"] = canonical_sha256({k: v for k, v in doc.items() if k != "sha256"})
        return json.dumps(doc)

    texts = {
        "overflow": _set(good(), ("device", "sm_count"), "1e999"),
        "deep": "[" * 100_000,
        "naive-time": _set(good(), ("bucket", "measurement", "measured_at"), '"2026-11-27T13:00:00"'),
        "naive-time-pack": naive_pack(),
        "huge-warps": _set(good(), ("bucket", "config", "num_warps"), "1048576"),
        "escape-name": _set(good(), ("device", "name"), json.dumps("H100\n\x1b[31mred")),
        "bytes": os.urandom(2048),
    }
    paths = {}
    for name, text in texts.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        paths[name] = path
    paths["fifo"] = tmp_path / "fifo.json"
    os.mkfifo(paths["fifo"])
    paths["oversized"] = tmp_path / "oversized.json"
    with open(paths["oversized"], "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    if os.path.exists("/proc/self/mem"):
        paths["unreadable"] = "/proc/self/mem"  # regular, unreadable from offset 0 even for root
    return paths


COMMANDS = {
    "show": lambda bad, tmp: ["show", bad],
    "show --cache-dir": lambda bad, tmp: ["show", "--cache-dir", _as_cache_dir(bad, tmp)],
    "install": lambda bad, tmp: ["install", bad, "--cache-dir", tmp / "target"],
    "install --dry-run": lambda bad, tmp: ["install", bad, "--cache-dir", tmp / "target", "--dry-run"],
    "merge": lambda bad, tmp: ["merge", tmp / "good.json", bad, "-o", tmp / "out.json"],
    "diff": lambda bad, tmp: ["diff", tmp / "good.json", bad],
    "export": lambda bad, tmp: ["export", "--cache-dir", _as_cache_dir(bad, tmp), "-o", tmp / "out.json"],
}


def _as_cache_dir(bad, tmp_path):
    """A cache directory whose H100 file is ``bad`` (a symlink keeps FIFOs and /proc files as they are)."""
    directory = tmp_path / "as-dir"
    directory.mkdir(exist_ok=True)
    link = directory / CacheFile.new(H100, SOFTWARE, command="x").name
    if os.path.lexists(link):
        link.unlink()
    link.symlink_to(bad)
    return directory


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_on_every_hostile_file(cli, tmp_path, rng, command):
    (tmp_path / "good.json").write_text(random_cache_file(rng, software=SOFTWARE).dumps())
    for name, bad in _hostile_files(tmp_path, rng).items():
        result = cli(*COMMANDS[command](bad, tmp_path))
        if name == "fifo" and command in ("show --cache-dir", "export"):
            # In a directory, what is not a regular file is no cache file: skipped as if absent
            # (show lists an empty layer; export finds nothing to export).
            assert (result.code, "Traceback" in result.stderr) == (0 if command.startswith("show") else 2, False)
            continue
        one_line_error(result)
        assert not (tmp_path / "target").exists() and not (tmp_path / "out.json").exists(), (name, command)


def test_doctor_reports_hostile_files_and_exits_0(cli, tmp_path, rng):
    directory = tmp_path / "c"
    directory.mkdir()
    files = _hostile_files(tmp_path, rng)
    for i, (name, bad) in enumerate(sorted(files.items())):
        if name != "fifo":
            (directory / f"gpu-{i}__triton-3.6.0.json").symlink_to(bad)
    os.mkfifo(directory / "gpu-fifo__triton-3.6.0.json")
    for extra in ([], ["--json"]):
        result = cli("doctor", "--cache-dir", directory, *extra, env={"COLUMNS": "200"})
        assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    layer = next(layer for layer in json.loads(result.stdout)["caches"] if layer["layer"] == "explicit")
    assert len(layer["files"]) == len(files) - 1  # the FIFO is no cache file
    assert all("error" in f and "\n" not in f["error"] for f in layer["files"])


# -------------------------------------------------------------------------------------------------
# Help and usage errors
# -------------------------------------------------------------------------------------------------


def test_sweep_help_keeps_every_default_note(cli):
    result = cli("sweep", "--help", env={"COLUMNS": "120"})
    assert result.code == 0
    text = " ".join(result.stdout.split())
    for note in ("[default: 1024..32768 by powers of two", "[default: bfloat16;", "[default: default;",
                 "[default: the CPU cores less one per GPU", "[default: every visible GPU;", "[default: 6 hours]"):
        assert note in text, note


@pytest.mark.parametrize("command", ["show", "export", "install", "merge", "diff", "models", "sweep", "doctor",
                                     "verify", "bench"])
def test_boolean_flags_show_as_flags(cli, command):
    assert set(COMMAND_MODULES) >= {"show", "pack", "models", "sweep", "doctor", "verify", "bench"}
    result = cli(command, "--help", env={"COLUMNS": "120"})
    assert result.code == 0, result.stderr
    assert "<bool>" not in result.stdout
    if command in ("show", "doctor", "models"):
        assert any(line.split()[:1] == ["--json"] for line in result.stdout.splitlines())


@pytest.mark.parametrize("args, words", [
    (["show", "--bogus"], "No such option: --bogus"),
    (["models", "--ep", "0"], "--ep"),
    (["install"], "Missing argument"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line(cli, args, words):
    line = one_line_error(cli(*args))
    assert words in line and "--help" in line


def test_no_arguments_prints_the_help(cli):
    result = cli()
    assert result.code == 0 and "Commands:" in result.stdout


def test_control_characters_in_a_path_stay_on_one_line(cli, tmp_path):
    line = one_line_error(cli("show", tmp_path / "two\nlines\x1b[2J.json"))
    assert "two\\nlines\\x1b[2J.json" in line


# -------------------------------------------------------------------------------------------------
# install --dry-run, merge messages, verify without a GPU
# -------------------------------------------------------------------------------------------------


def test_install_dry_run_fails_where_install_fails(cli, tmp_path, rng):
    pack = tmp_path / "p.json"
    pack.write_text(Pack([random_cache_file(rng, software=SOFTWARE)]).dumps())
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a regular file")
    dry = one_line_error(cli("install", pack, "--cache-dir", not_a_dir, "--dry-run"))
    real = one_line_error(cli("install", pack, "--cache-dir", not_a_dir))
    assert "cannot create the cache directory" in dry and "cannot create the cache directory" in real
    assert not_a_dir.read_text() == "a regular file"


def test_merge_same_name_other_capability_says_what_differs(cli, tmp_path, rng):
    a = random_cache_file(rng, software=SOFTWARE)
    b = random_cache_file(rng, device=dataclasses.replace(H100, capability=(8, 0)), software=SOFTWARE)
    (tmp_path / "a.json").write_text(a.dumps())
    (tmp_path / "b.json").write_text(b.dumps())
    line = one_line_error(cli("merge", tmp_path / "a.json", tmp_path / "b.json", "-o", tmp_path / "m.json"))
    assert "compute capability 9.0 vs 8.0" in line
    CacheStore(tmp_path / "store").write(a)
    for extra in ([], ["--dry-run"]):
        line = one_line_error(cli("install", tmp_path / "b.json", "--cache-dir", tmp_path / "store", *extra))
        assert "compute capability 9.0 vs 8.0" in line


def test_verify_without_a_gpu_names_verify(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    line = one_line_error(cli("verify"))
    assert "`moe-tune verify`" in line and "sweep" not in line
