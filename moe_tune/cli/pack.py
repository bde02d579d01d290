"""Shipping caches between machines: ``export``, ``install``, ``merge`` and ``diff``.

Data flow:

* ``export``: a cache directory (``--cache-dir``, else ``$MOE_TUNE_CACHE_DIR``, else the user
  dir) → cache files filtered by ``--device`` and ``--model`` → one ``Pack`` (manifest + sha256
  over its canonical JSON) written atomically to ``-o``.
* ``install``: a pack (or a single cache file) → validated (schema, checksum, manifest names
  against content) → each cache merged under the store's lock into the target directory
  (``--dry-run``: ``CacheStore.preview``, which fails wherever the write would). Packs are data
  only: the target file name is derived from the device name and Triton version through
  ``paths.file_name`` (a sanitised slug), never taken from the pack.
* ``merge``: cache files, packs or directories → grouped by (device, Triton) and merged with the
  cache's merge rule → one cache file, or a pack when the result spans several devices or Triton
  versions (or with ``--pack``).
* ``diff``: two inputs → entries added, removed and changed, keyed by (file, problem, bucket).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from moe_tune.cache import paths
from moe_tune.cache.pack import Pack
from moe_tune.cache.schema import merge_all
from moe_tune.cache.store import CacheStore, atomic_write_text, read_inputs
from moe_tune.cli.options import CacheDirOption, DryRunOption, JsonOption, ModelOption, OutputOption, model_filter
from moe_tune.errors import CacheError, InvalidInputError

InputsArgument = Annotated[list[Path], typer.Argument(help="Cache files, packs or cache directories.",
                                                      show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("install")(install)
    app.command("merge")(merge)
    app.command("diff")(diff)


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def _write(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise CacheError(f"{path}: cannot write ({exc.strerror or exc})") from None


# -------------------------------------------------------------------------------------------------
# export / install
# -------------------------------------------------------------------------------------------------


def export(
    output: OutputOption,
    model: ModelOption = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Only this GPU (its name or file slug).",
                                               show_default=False)] = None,
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Bundle cached configs into one self-contained pack for shipping to a cluster."""
    store = CacheStore(cache_dir)
    if not store.directory.is_dir():
        raise CacheError(f"{store.directory}: no such cache directory")
    keep = model_filter(model)
    wanted = None if device is None else paths.device_slug(device)
    caches = []
    for path in store.files():
        cache = read_inputs(path)[0][1]
        if wanted is not None and paths.device_slug(cache.device.name) != wanted:
            continue
        selected = cache.select(keep)
        if len(selected):
            caches.append(selected)
    if not caches:
        what = " and ".join(f for f in (f"device {device!r}" if device else "", f"model {model!r}" if model else "") if f)
        raise CacheError(f"{store.directory}: no cache entries to export" + (f" for {what}" if what else ""))
    pack = Pack(caches, command=" ".join(["moe-tune export", *(["--model", model] if model else []),
                                          *(["--device", device] if device else [])]), model=model)
    _write(output, pack.dumps())
    manifest = pack.to_json()["manifest"]
    _emit({"output": str(output), "manifest": manifest}, as_json,
          f"wrote {output}: {len(caches)} cache file(s), {sum(len(c) for c in caches)} entries")


def install(
    pack: Annotated[Path, typer.Argument(help="A pack from `moe-tune export` (or one cache file).",
                                         show_default=False)],
    cache_dir: CacheDirOption = None,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Validate a pack and merge it into the target cache directory."""
    if pack.is_dir():
        raise InvalidInputError(f"{pack}: install takes a pack or a cache file, not a directory")
    caches = [cache for _, cache in read_inputs(pack)]
    store = CacheStore(cache_dir)
    results = []
    for cache in caches:
        # The preview fails wherever the write would, so a dry run that passes means an install will.
        result = store.preview(cache) if dry_run else store.write(cache)
        results.append({"path": str(result.path), "device": cache.device.name, "triton": cache.triton,
                        **result.stats.to_dict()})
    verb = "would merge" if dry_run else "merged"
    lines = [f"{verb} {r['device']} / Triton {r['triton']} into {r['path']}: "
             f"{r['added']} added, {r['replaced']} replaced, {r['kept']} kept" for r in results]
    _emit({"dry_run": dry_run, "files": results}, as_json, "\n".join(lines))


# -------------------------------------------------------------------------------------------------
# merge / diff
# -------------------------------------------------------------------------------------------------


def merge(
    inputs: InputsArgument,
    output: OutputOption,
    as_pack: Annotated[bool, typer.Option("--pack", help="Write a pack even for a single device.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Merge caches (files, packs, directories) with the cache's merge rule into one output."""
    if len(inputs) < 2:
        raise InvalidInputError("merge needs at least two inputs")
    merged, stats = merge_all(cache for path in inputs for _, cache in read_inputs(path))
    if not merged:
        raise CacheError("the inputs hold no cache files")
    # A cache file holds one device and one Triton version; anything wider travels as a pack.
    if as_pack or len(merged) > 1:
        text = Pack(merged, command="moe-tune merge").dumps()
    else:
        text = merged[0].dumps()
    _write(output, text)
    kind = "pack" if as_pack or len(merged) > 1 else "cache file"
    _emit({"output": str(output), "kind": kind, "files": [c.name for c in merged], **stats.to_dict()}, as_json,
          f"wrote {kind} {output}: {len(merged)} cache file(s), {sum(len(c) for c in merged)} entries "
          f"({stats.replaced} replaced, {stats.kept} kept on conflicts)")


def _flatten(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    caches, _ = merge_all(cache for _, cache in read_inputs(path))
    out = {}
    for cache in caches:
        for problem, buckets in cache.entries.items():
            for tokens, entry in buckets.items():
                out[(cache.name, problem.key, tokens)] = {
                    "config": entry.config.to_dict(), "config_short": entry.config.short(),
                    "tflops": entry.measurement.tflops, "median_ms": entry.measurement.median_ms,
                    "correct": entry.measurement.correct, "measurement": entry.measurement.to_dict(),
                    "software": entry.software.to_dict(),
                }
    return out


def diff(
    a: Annotated[Path, typer.Argument(help="The old cache file, pack or directory.", show_default=False)],
    b: Annotated[Path, typer.Argument(help="The new cache file, pack or directory.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """What differs between two caches: entries added, removed and changed (config or timing)."""
    old, new = _flatten(a), _flatten(b)

    def where(key: tuple[str, str, int]) -> dict[str, Any]:
        return {"file": key[0], "problem": key[1], "tokens": key[2]}

    added = [{**where(k), "config": new[k]["config"], "tflops": new[k]["tflops"]} for k in sorted(new.keys() - old.keys())]
    removed = [{**where(k), "config": old[k]["config"], "tflops": old[k]["tflops"]} for k in sorted(old.keys() - new.keys())]
    changed, same = [], 0
    for k in sorted(old.keys() & new.keys()):
        before, after = old[k], new[k]
        if before == after:
            same += 1
            continue
        changed.append({**where(k), "config_changed": before["config"] != after["config"],
                        "before": {"config": before["config"], "tflops": before["tflops"], "median_ms": before["median_ms"]},
                        "after": {"config": after["config"], "tflops": after["tflops"], "median_ms": after["median_ms"]}})
    data = {"a": str(a), "b": str(b), "added": added, "removed": removed, "changed": changed, "unchanged": same}
    lines = [f"+ {e['file']} {e['problem']} @{e['tokens']}: {new[(e['file'], e['problem'], e['tokens'])]['config_short']} "
             f"({e['tflops']:.1f} TFLOP/s)" for e in added]
    lines += [f"- {e['file']} {e['problem']} @{e['tokens']}: {old[(e['file'], e['problem'], e['tokens'])]['config_short']} "
              f"({e['tflops']:.1f} TFLOP/s)" for e in removed]
    for e in changed:
        k = (e["file"], e["problem"], e["tokens"])
        lines.append(f"~ {e['file']} {e['problem']} @{e['tokens']}: {old[k]['config_short']} "
                     f"({old[k]['tflops']:.1f}) -> {new[k]['config_short']} ({new[k]['tflops']:.1f} TFLOP/s)")
    lines.append(f"{len(added)} added, {len(removed)} removed, {len(changed)} changed, {same} unchanged")
    _emit(data, as_json, "\n".join(lines))
