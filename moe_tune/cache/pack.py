"""The pack format: cache files bundled for shipping (``moe-tune export``, read by ``install``,
``merge``, ``diff`` and ``show``).

Data flow: cache files → ``Pack.to_json``: a manifest (what each file is for and how many
entries it holds), the files themselves and a sha256 over the canonical JSON of both (sorted keys,
no whitespace) → ``schema.dumps`` to disk. Reading goes back through ``Pack.loads``: the bounded
parser (``fields.loads``), the version check (``schema.upgrade``), the checksum, then every cache
file validated as on its own and each manifest name matched against the content it describes, so
a copy damaged or edited in transit is refused. Packs are data only: ``install`` derives every
target file name again from the content (``paths.file_name``), never from the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from moe_tune._version import __version__
from moe_tune.cache.fields import Fields, loads, show
from moe_tune.cache.schema import CACHE_KIND, PACK_KIND, SCHEMA_VERSION, CacheFile, dumps, now_iso, upgrade
from moe_tune.errors import CacheError


def canonical_sha256(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass
class Pack:
    """Cache files bundled for shipping: data only, names derived from content on install."""

    caches: list[CacheFile]
    created: str = field(default_factory=now_iso)
    command: str = ""
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        caches = sorted(self.caches, key=lambda c: c.name)
        manifest = {
            "created": self.created,
            "moe_tune": __version__,
            "command": self.command,
            "model": self.model,
            "files": [{"name": c.name, "device": c.device.name, "capability": list(c.device.capability),
                       "triton": c.triton, "problems": len(c.entries), "entries": len(c)} for c in caches],
        }
        payload = {"schema_version": SCHEMA_VERSION, "kind": PACK_KIND, "manifest": manifest,
                   "caches": [c.to_json() for c in caches]}
        return {**payload, "sha256": canonical_sha256(payload)}

    def dumps(self) -> str:
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Any, source: str = "pack") -> "Pack":
        data = upgrade(data, source, PACK_KIND)
        top = Fields(data, source)
        claimed = top.name("sha256")
        payload = {k: v for k, v in data.items() if k != "sha256"}
        try:
            actual = canonical_sha256(payload)
        except ValueError as exc:  # NaN or infinity in data that did not come through fields.loads
            raise CacheError(f"{source}: {exc}") from None
        if claimed != actual:
            raise CacheError(f"{source}: checksum mismatch (manifest says {show(claimed[:12])}…, content is "
                             f"{actual[:12]}…): the pack was damaged or edited after export")
        manifest = top.obj("manifest")
        files = manifest.list("files")
        caches = [CacheFile.from_json(c, f"{source}.caches[{i}]") for i, c in enumerate(top.list("caches"))]
        if len(files) != len(caches):
            raise CacheError(f"{source}: the manifest lists {len(files)} files but the pack holds {len(caches)}")
        seen = set()
        for i, (listed, cache) in enumerate(zip(files, caches)):
            name = Fields(listed, f"{manifest.where}.files[{i}]").name("name")
            # The name is never used as a path (install derives it from the content); a mismatch
            # means the manifest lies about what the pack holds.
            if name != cache.name:
                raise CacheError(f"{source}: manifest file {i} is named {show(name)} but holds a cache for "
                                 f"{cache.target} ({cache.name})")
            if cache.name in seen:
                raise CacheError(f"{source}: two caches for {cache.target}")
            seen.add(cache.name)
        return cls(caches=caches, created=manifest.time("created"), command=manifest.text("command"),
                   model=manifest.name("model", optional=True))

    @classmethod
    def loads(cls, text: str | bytes, source: str = "pack") -> "Pack":
        return cls.from_json(loads(text, source), source)


def load_any(text: str | bytes, source: str) -> tuple[str, list[CacheFile]]:
    """A cache file or a pack → (its kind, the cache files it holds), for commands taking either."""
    data = loads(text, source)
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == PACK_KIND:
        return PACK_KIND, Pack.from_json(data, source).caches
    return CACHE_KIND, [CacheFile.from_json(data, source)]
