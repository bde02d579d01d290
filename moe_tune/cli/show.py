"""``moe-tune show``: what the caches hold, per problem: bucket → config, TFLOP/s, speedup.

Data flow: PATH (a cache file, a pack or a directory) or ``--cache-dir DIR``, else every search
layer the runtime would read (``moe_tune.cache.paths.search_layers``: env dir, user dir, shipped
caches) → parsed ``CacheFile`` objects (an unreadable file is bad input: exit 2) → optionally
filtered to one model's problems → ``report`` (plain data) → JSON on stdout (``--json``) or rich
tables on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from moe_tune.cache import paths
from moe_tune.cache.schema import CacheFile
from moe_tune.cache.store import read_cache_file, read_inputs
from moe_tune.cli.options import CacheDirOption, JsonOption, ModelOption, model_filter
from moe_tune.errors import CacheError, InvalidInputError
from moe_tune.problem import Problem


def register(app: typer.Typer) -> None:
    app.command("show")(show)


def show(
    path: Annotated[Optional[Path], typer.Argument(help="A cache file, a pack or a cache directory.",
                                                   show_default=False)] = None,
    cache_dir: CacheDirOption = None,
    model: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show tuned configs per problem. With no PATH, list every layer the runtime searches."""
    if path is not None and cache_dir is not None:
        raise InvalidInputError("give a PATH or --cache-dir, not both")
    keep = model_filter(model) if model is not None else None
    if path is not None:
        sources = [_source("path", path, read_inputs(path), keep)]
    elif cache_dir is not None:
        sources = [_source("cache-dir", cache_dir, read_inputs(cache_dir) if cache_dir.exists() else [], keep)]
    else:
        sources = [_source(layer.name, layer.root, _layer_files(layer), keep) for layer in paths.search_layers()]
    data = {"model": model, "sources": sources}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_tables(data)


def _layer_files(layer: paths.Layer) -> list[tuple[str, CacheFile]]:
    try:
        files = layer.cache_files()
    except OSError as exc:
        raise CacheError(f"cannot list {layer}: {exc.strerror or exc}") from None
    return [(str(f), read_cache_file(f)) for f in files]


def _source(name: str, root: Any, caches: list[tuple[str, CacheFile]], keep: Callable[[Problem], bool] | None) -> dict:
    if keep is not None:
        # With --model, a file holding none of the model's problems is noise.
        caches = [(origin, selected) for origin, cache in caches if len(selected := cache.select(keep))]
    return {"layer": name, "root": str(root), "files": [report(origin, cache) for origin, cache in caches]}


def report(origin: str, cache: CacheFile) -> dict[str, Any]:
    """One cache file as plain data: device, software, and per problem its buckets."""
    problems = []
    for problem in cache.problems():
        buckets = []
        for tokens, entry in sorted(cache.entries[problem].items()):
            m = entry.measurement
            buckets.append({
                "tokens": tokens,
                "config": entry.config.to_dict(),
                "config_short": entry.config.short(),
                "median_ms": m.median_ms,
                "spread_ms": m.spread_ms,
                "tflops": m.tflops,
                "default_ms": m.default_ms,
                "speedup": None if m.speedup is None else round(m.speedup, 4),
                "candidates": m.candidates,
                "correct": m.correct,
                "max_rel_err": m.max_rel_err,
            })
        problems.append({"key": problem.key, "problem": problem.to_dict(), "buckets": buckets})
    return {"path": origin, "device": cache.device.to_dict(), "software": cache.software.to_dict(),
            "entries": len(cache), "problems": problems}


def _print_tables(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # markup off: paths and problem keys are data ("pack.json[nvidia-…]" is not a style tag).
    console = Console(highlight=False, markup=False)
    for source in data["sources"]:
        count = len(source["files"])
        console.rule(f"{source['layer']}: {source['root']} ({count} file{'s' * (count != 1)})")
        for f in source["files"]:
            device, software = f["device"], f["software"]
            console.print(f"{f['path']}\n  {device['name']} (sm{device['capability'][0]}{device['capability'][1]}, "
                          f"{device['sm_count']} SMs), Triton {software['triton']}, torch {software['torch']}, "
                          f"kernels {software['kernel_hash']}: {f['entries']} entries")
            for problem in f["problems"]:
                table = Table(title=problem["key"], title_justify="left")
                for column in ("tokens", "config", "ms", "TFLOP/s", "vs default", "gate"):
                    table.add_column(column, justify="left" if column == "config" else "right")
                for b in problem["buckets"]:
                    speedup = "-" if b["speedup"] is None else f"{b['speedup']:.2f}x"
                    table.add_row(str(b["tokens"]), b["config_short"], f"{b['median_ms']:.4g}", f"{b['tflops']:.1f}",
                                  speedup, "pass" if b["correct"] else "FAIL")
                console.print(table)
