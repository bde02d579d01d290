"""The ``--routing`` spec: how tokens spread over experts while the sweep tunes.

``RoutingSpec.parse`` reads the flag (``uniform``, ``zipf:S``, ``trace:FILE``); ``str()`` writes it
back (the cache's provenance command); ``identity()`` is what a resumed journal must match;
``top_k_ids`` turns it into the ``[T, k]`` expert ids of one token bucket, the same for the same
seed in every process (the timing workers build their inputs from it).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

from moe_tune.errors import InvalidInputError


@dataclass(frozen=True)
class RoutingSpec:
    """How tokens are spread over experts while tuning: ``uniform`` (random router logits →
    top-k), ``zipf:S`` (logits biased by −S·log(rank): a skewed router) or ``trace:FILE`` (recorded
    top-k ids, a ``.pt`` or ``.npy`` of int ``[T, k]``; buckets take its first T rows, cycling)."""

    kind: str = "uniform"
    skew: float = 0.0
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{self.skew:g}"
        if self.kind == "trace":
            return f"trace:{self.path}"
        return "uniform"

    @classmethod
    def parse(cls, text: str) -> "RoutingSpec":
        kind, _, arg = text.strip().partition(":")
        if kind == "uniform" and not arg:
            return cls()
        if kind == "zipf":
            try:
                skew = float(arg)
            except ValueError:
                skew = -1.0
            if not math.isfinite(skew) or skew <= 0:
                raise InvalidInputError(f"--routing zipf:S needs a positive exponent S, got {arg!r}")
            return cls("zipf", skew=skew)
        if kind == "trace" and arg:
            return cls("trace", path=os.path.abspath(os.path.expanduser(arg)))
        raise InvalidInputError(f"--routing takes uniform, zipf:S or trace:FILE; got {text!r}")

    def identity(self) -> str:
        """What the sweep journal compares on --resume: a trace counts by its content."""
        if self.kind != "trace":
            return str(self)
        with open(self.path, "rb") as f:
            return f"trace:sha256={hashlib.sha256(f.read()).hexdigest()[:16]}"

    def load_trace(self, num_experts: int, topk: int):
        """The trace's ids as an int64 ``[T, k]`` CPU tensor, validated against the shape."""
        import torch

        path = self.path
        try:
            if path.endswith(".npy"):
                try:
                    import numpy
                except ImportError:
                    raise InvalidInputError("reading a .npy trace needs numpy (pip install numpy)") from None
                ids = torch.from_numpy(numpy.load(path, allow_pickle=False))
            else:
                ids = torch.load(path, map_location="cpu", weights_only=True)
        except InvalidInputError:
            raise
        except FileNotFoundError:
            raise InvalidInputError(f"routing trace {path} does not exist") from None
        except Exception as exc:  # torch.load and numpy.load raise a zoo of types on bad files
            raise InvalidInputError(f"cannot read the routing trace {path}: {exc}") from None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InvalidInputError(f"routing trace {path} must hold an int tensor [T, k], got "
                                    f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        if ids.shape[1] != topk:
            raise InvalidInputError(f"routing trace {path} has k={ids.shape[1]} experts per token, the model has topk={topk}")
        if ids.numel() == 0:
            raise InvalidInputError(f"routing trace {path} is empty")
        ids = ids.long()
        if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
            raise InvalidInputError(f"routing trace {path} holds expert ids outside [0, {num_experts})")
        return ids

    def top_k_ids(self, num_tokens: int, num_experts: int, topk: int, seed: int):
        """``[T, k]`` int64 expert ids on the CPU, the same for the same arguments."""
        import torch

        if self.kind == "trace":
            ids = self.load_trace(num_experts, topk)
            reps = -(-num_tokens // ids.shape[0])
            return ids.repeat(reps, 1)[:num_tokens].contiguous()
        from moe_tune.ops.routing import random_routing

        gen = torch.Generator().manual_seed(seed)
        return random_routing(num_tokens, num_experts, topk, generator=gen, skew=self.skew)
