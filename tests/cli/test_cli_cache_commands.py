"""``moe-tune show / export / install / merge / diff`` through the real entry point, JSON parsed
back; every kind of bad input exits 2 with one line on stderr and no traceback."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_tune.cache import CacheFile, CacheStore, Pack, read_cache_file
from moe_tune.cache.software import Software
from moe_tune.cache.testing import H100, random_cache_file, random_config, random_measurement
from moe_tune.device import DeviceInfo
from moe_tune.problem import MoeShape

H200 = DeviceInfo("NVIDIA H200", (9, 0), sm_count=132, max_shared_mem=232448)
SOFTWARE = Software(triton="3.6.0", torch="2.11.0", cuda="13.0", moe_tune="0.1.0", kernel_hash="0123456789abcdef")
QWEN3_30B = MoeShape(E=128, H=2048, I=768, topk=8)


def model_cache(rng, device=H100, buckets=(1024, 16384), extra=2) -> CacheFile:
    """A cache with qwen3-30b-a3b's six problems plus ``extra`` unrelated random ones."""
    cache = random_cache_file(rng, device=device, software=SOFTWARE, problems=extra, buckets=2)
    for problem in QWEN3_30B.problems():
        for tokens in buckets:
            cache.add(problem, tokens, random_config(rng), random_measurement(rng))
    return cache


def one_line_error(result) -> str:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# -------------------------------------------------------------------------------------------------
# show
# -------------------------------------------------------------------------------------------------


def test_show_json_matches_the_file(cli, tmp_path, rng):
    cache = model_cache(rng)
    CacheStore(tmp_path / "c").write(cache)
    result = cli("show", "--cache-dir", tmp_path / "c", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    (source,) = data["sources"]
    (shown,) = source["files"]
    assert shown["device"] == H100.to_dict() and shown["entries"] == len(cache)
    for problem in shown["problems"]:
        for bucket in problem["buckets"]:
            entry = cache.entries[next(p for p in cache.entries if p.key == problem["key"])][bucket["tokens"]]
            assert bucket["config"] == entry.config.to_dict()
            assert bucket["tflops"] == entry.measurement.tflops
            assert bucket["speedup"] == pytest.approx(entry.measurement.speedup, rel=1e-3)


def test_show_path_takes_a_file_or_a_pack(cli, tmp_path, rng):
    cache = model_cache(rng)
    path = CacheStore(tmp_path).write(cache).path
    pack = tmp_path / "p.pack.json"
    pack.write_text(Pack([cache, model_cache(rng, device=H200)]).dumps())
    assert json.loads(cli("show", path, "--json").stdout)["sources"][0]["files"][0]["entries"] == len(cache)
    files = json.loads(cli("show", pack, "--json").stdout)["sources"][0]["files"]
    assert sorted(f["device"]["name"] for f in files) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]


def test_show_without_arguments_lists_every_layer(cli, layers, rng):
    CacheStore(layers.env).write(model_cache(rng))
    CacheStore(layers.user).write(model_cache(rng, device=H200))
    layers.shipped.mkdir()
    result = cli("show", "--json", env={"MOE_TUNE_CACHE_DIR": str(layers.env)})
    assert result.code == 0, result.stderr
    sources = json.loads(result.stdout)["sources"]
    assert [(s["layer"], len(s["files"])) for s in sources] == [("env", 1), ("user", 1), ("shipped", 0)]
    assert sources[1]["files"][0]["device"]["name"] == "NVIDIA H200"


def test_show_model_filters_to_its_six_problems(cli, tmp_path, rng):
    cache = model_cache(rng, extra=3)
    # The forward down GEMM without the fused routing weight (weights needing a gradient) counts too.
    unfused = dataclasses.replace(QWEN3_30B.problems()[3], weighted=False, dtype="float16")
    cache.add(unfused, 64, random_config(rng), random_measurement(rng))
    CacheStore(tmp_path).write(cache)
    data = json.loads(cli("show", "--cache-dir", tmp_path, "--model", "qwen3-30b-a3b", "--json").stdout)
    keys = {p["key"] for p in data["sources"][0]["files"][0]["problems"]}
    assert keys == {p.key for p in QWEN3_30B.problems()} | {unfused.key}


def test_show_table_output(cli, tmp_path, rng):
    cache = model_cache(rng, extra=0)
    CacheStore(tmp_path).write(cache)
    result = cli("show", "--cache-dir", tmp_path, env={"COLUMNS": "200"})
    assert result.code == 0, result.stderr
    problem = cache.problems()[0]
    entry = cache.entries[problem][1024]
    assert problem.key in result.stdout and entry.config.short() in result.stdout
    assert f"{entry.measurement.speedup:.2f}x" in result.stdout


# -------------------------------------------------------------------------------------------------
# Bad input, every command
# -------------------------------------------------------------------------------------------------


def _bad_files(tmp_path, rng) -> dict:
    good = model_cache(rng).to_json()
    future = dict(good, schema_version="4.0")
    wrong = json.loads(json.dumps(good))
    next(iter(wrong["entries"].values()))["buckets"][0]["measurement"]["candidates"] = "many"
    pack = Pack([model_cache(rng)]).to_json()
    pack["manifest"]["command"] = "edited after export"
    files = {
        "missing": None,
        "empty": "",
        "truncated": json.dumps(good, indent=2)[:300],
        "not-json": "<html>not json</html>",
        "future-version": json.dumps(future),
        "wrong-typed": json.dumps(wrong),
        "checksum": json.dumps(pack),
    }
    out = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        if text is not None:
            path.write_text(text)
        out[name] = path
    return out


@pytest.mark.parametrize("command", ["show", "install", "diff", "merge"])
@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not-json", "future-version", "wrong-typed",
                                    "checksum"])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, rng, command, damage):
    bad = _bad_files(tmp_path, rng)[damage]
    good = CacheStore(tmp_path / "good").write(model_cache(rng)).path
    args = {
        "show": ["show", bad],
        "install": ["install", bad, "--cache-dir", tmp_path / "target"],
        "diff": ["diff", good, bad],
        "merge": ["merge", good, bad, "-o", tmp_path / "out.json"],
    }[command]
    line = one_line_error(cli(*args))
    assert bad.name in line
    if damage == "future-version":
        assert "newer moe-tune" in line
    if damage == "checksum":
        assert "checksum mismatch" in line
    assert not (tmp_path / "target").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("args", [
    ["show", "--model", "no-such-model"],
    ["export", "--model", "no-such-model", "-o", "x.json"],
])
def test_unknown_model_exits_2(cli, tmp_path, rng, args):
    CacheStore(tmp_path / "c").write(model_cache(rng))
    line = one_line_error(cli(*args, "--cache-dir", tmp_path / "c"))
    assert "unknown model" in line


def test_debug_lets_the_error_through(tmp_path, monkeypatch):
    from moe_tune.cli.app import main
    from moe_tune.errors import CacheError

    monkeypatch.setenv("MOE_TUNE_DEBUG", "1")
    with pytest.raises(CacheError, match="no such file"):
        main(["show", str(tmp_path / "missing.json")])


# -------------------------------------------------------------------------------------------------
# export / install
# -------------------------------------------------------------------------------------------------


def test_export_install_round_trip(cli, tmp_path, rng):
    h100, h200 = model_cache(rng), model_cache(rng, device=H200)
    CacheStore(tmp_path / "src").write(h100)
    CacheStore(tmp_path / "src").write(h200)
    pack = tmp_path / "cluster.pack"
    result = cli("export", "--cache-dir", tmp_path / "src", "-o", pack, "--json")
    assert result.code == 0, result.stderr
    manifest = json.loads(result.stdout)["manifest"]
    assert sorted(f["device"] for f in manifest["files"]) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    doc = json.loads(pack.read_text())
    assert len(doc["sha256"]) == 64 and doc["kind"] == "moe-tune-pack"

    result = cli("install", pack, "--cache-dir", tmp_path / "dst", "--json")
    assert result.code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert sorted(f["added"] for f in files) == sorted([len(h100), len(h200)])
    assert read_cache_file(tmp_path / "dst" / h100.name).entries == h100.entries
    assert read_cache_file(tmp_path / "dst" / h200.name).entries == h200.entries

    again = json.loads(cli("install", pack, "--cache-dir", tmp_path / "dst", "--json").stdout)["files"]
    assert all(f["added"] == 0 and f["replaced"] == 0 and f["kept"] > 0 for f in again)


def test_export_filters_by_device_and_model(cli, tmp_path, rng):
    CacheStore(tmp_path / "src").write(model_cache(rng, extra=3))
    CacheStore(tmp_path / "src").write(model_cache(rng, device=H200))
    result = cli("export", "--cache-dir", tmp_path / "src", "--device", "nvidia-h200", "--model", "qwen3-30b-a3b",
                 "-o", tmp_path / "p.json")
    assert result.code == 0, result.stderr
    (cache,) = Pack.loads((tmp_path / "p.json").read_text()).caches
    assert cache.device == H200
    assert {p.key for p in cache.problems()} == {p.key for p in QWEN3_30B.problems()}
    line = one_line_error(cli("export", "--cache-dir", tmp_path / "src", "--device", "NVIDIA A100", "-o", tmp_path / "q"))
    assert "no cache entries" in line
    assert "no such cache directory" in one_line_error(cli("export", "--cache-dir", tmp_path / "none", "-o", tmp_path / "q"))


def test_install_default_target_is_the_env_dir(cli, layers, tmp_path, rng):
    pack = tmp_path / "p.json"
    cache = model_cache(rng)
    pack.write_text(Pack([cache]).dumps())
    result = cli("install", pack, env={"MOE_TUNE_CACHE_DIR": str(layers.env)})
    assert result.code == 0, result.stderr
    assert read_cache_file(layers.env / cache.name).entries == cache.entries


def test_install_never_writes_outside_the_target(cli, tmp_path, rng):
    evil = DeviceInfo("../../../etc/passwd", (9, 0), 132, 232448)
    cache = model_cache(rng, device=evil)
    cache.software = dataclasses.replace(SOFTWARE, triton="../../x")
    cache.entries = {p: {t: dataclasses.replace(e, software=cache.software) for t, e in b.items()}
                     for p, b in cache.entries.items()}
    pack = tmp_path / "evil.json"
    pack.write_text(Pack([cache]).dumps())
    before = set(tmp_path.parent.iterdir())
    target = tmp_path / "target"
    result = cli("install", pack, "--cache-dir", target, "--json")
    assert result.code == 0, result.stderr
    written = [p.name for p in target.iterdir() if not p.name.endswith(".lock")]
    assert written == ["etc-passwd__triton-x.json"]
    assert set(tmp_path.parent.iterdir()) == before
    assert not (tmp_path / "etc").exists()


def test_install_dry_run_writes_nothing(cli, tmp_path, rng):
    pack = tmp_path / "p.json"
    cache = model_cache(rng)
    pack.write_text(Pack([cache]).dumps())
    result = cli("install", pack, "--cache-dir", tmp_path / "t", "--dry-run", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["dry_run"] and data["files"][0]["added"] == len(cache)
    assert not (tmp_path / "t").exists()


# -------------------------------------------------------------------------------------------------
# merge / diff
# -------------------------------------------------------------------------------------------------


def test_merge_same_device_writes_a_cache_file_keeping_the_faster(cli, tmp_path, rng):
    a = model_cache(rng)
    b = CacheFile.loads(a.dumps())
    problem = a.problems()[0]
    tokens = min(a.entries[problem])
    slow = a.entries[problem][tokens].measurement
    faster_cfg = random_config(rng)
    b.entries[problem][tokens] = dataclasses.replace(
        b.entries[problem][tokens], config=faster_cfg, measurement=dataclasses.replace(slow, median_ms=slow.median_ms / 3))
    extra = random_cache_file(rng, software=SOFTWARE, problems=1, buckets=1)
    (p_extra,) = extra.entries
    b.entries[p_extra] = extra.entries[p_extra]
    (tmp_path / "a.json").write_text(a.dumps())
    (tmp_path / "b.json").write_text(b.dumps())
    result = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "-o", tmp_path / "m.json", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "cache file" and data["replaced"] == 1 and data["added"] >= len(a) + 1
    merged = read_cache_file(tmp_path / "m.json")
    assert merged.entries[problem][tokens].config == faster_cfg
    assert len(merged) == len(a) + 1


def test_merge_across_devices_writes_a_pack(cli, tmp_path, rng):
    (tmp_path / "a.json").write_text(model_cache(rng).dumps())
    (tmp_path / "b.json").write_text(model_cache(rng, device=H200).dumps())
    result = cli("merge", tmp_path / "a.json", tmp_path / "b.json", "-o", tmp_path / "m.json", "--json")
    assert result.code == 0 and json.loads(result.stdout)["kind"] == "pack"
    assert len(Pack.loads((tmp_path / "m.json").read_text()).caches) == 2
    assert "at least two" in one_line_error(cli("merge", tmp_path / "a.json", "-o", tmp_path / "n.json"))


def test_diff_reports_added_removed_changed(cli, tmp_path, rng):
    a = model_cache(rng)
    b = CacheFile.loads(a.dumps())
    problems = a.problems()
    removed_problem, changed_problem = problems[0], problems[1]
    del b.entries[removed_problem]
    tokens = min(b.entries[changed_problem])
    b.entries[changed_problem][tokens] = dataclasses.replace(b.entries[changed_problem][tokens],
                                                             config=random_config(rng))
    b.add(dataclasses.replace(problems[2], E=problems[2].E * 2), 99, random_config(rng), random_measurement(rng))
    (tmp_path / "a.json").write_text(a.dumps())
    (tmp_path / "b.json").write_text(b.dumps())
    result = cli("diff", tmp_path / "a.json", tmp_path / "b.json", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["added"]) == 1 and data["added"][0]["tokens"] == 99
    assert {e["problem"] for e in data["removed"]} == {removed_problem.key}
    assert len(data["removed"]) == len(a.entries[removed_problem])
    changed = [e for e in data["changed"] if e["problem"] == changed_problem.key and e["tokens"] == tokens]
    assert len(changed) == 1
    text = cli("diff", tmp_path / "a.json", tmp_path / "b.json").stdout
    assert text.strip().endswith(f"{len(data['added'])} added, {len(data['removed'])} removed, "
                                 f"{len(data['changed'])} changed, {data['unchanged']} unchanged")
    same = json.loads(cli("diff", tmp_path / "a.json", tmp_path / "a.json", "--json").stdout)
    assert same["added"] == same["removed"] == same["changed"] == [] and same["unchanged"] == len(a)
