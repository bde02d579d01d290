"""The ``--routing`` spec (moe_tune/tuning/routing_spec.py): parsing, reproducible random routing,
skew, and recorded traces (.pt and .npy) with their validation."""

from __future__ import annotations

import numpy
import pytest
import torch

from moe_tune.errors import InvalidInputError
from moe_tune.tuning.routing_spec import RoutingSpec


def test_routing_specs_parse():
    assert RoutingSpec.parse("uniform") == RoutingSpec()
    assert RoutingSpec.parse("zipf:1.2") == RoutingSpec("zipf", skew=1.2)
    assert str(RoutingSpec.parse("zipf:1.2")) == "zipf:1.2"
    for bad in ("zipf", "zipf:-1", "zipf:nan", "trace:", "gaussian", "uniform:3"):
        with pytest.raises(InvalidInputError, match="--routing"):
            RoutingSpec.parse(bad)


def test_random_routing_is_reproducible_and_skew_skews(rng):
    seed = rng.getrandbits(31)
    a = RoutingSpec().top_k_ids(512, 16, 2, seed)
    assert torch.equal(a, RoutingSpec().top_k_ids(512, 16, 2, seed))
    assert a.shape == (512, 2) and int(a.min()) >= 0 and int(a.max()) < 16
    skewed = RoutingSpec("zipf", skew=2.0).top_k_ids(512, 16, 2, seed)
    counts = torch.bincount(skewed.flatten(), minlength=16)
    assert counts[:4].sum() > counts[-4:].sum() * 3


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_traces_load_cycle_and_validate(tmp_path, rng, suffix):
    ids = torch.randint(0, 8, (rng.randint(5, 40), 2))
    path = tmp_path / f"trace{suffix}"
    if suffix == ".pt":
        torch.save(ids, path)
    else:
        numpy.save(path, ids.numpy().astype(numpy.int32))
    spec = RoutingSpec.parse(f"trace:{path}")
    got = spec.top_k_ids(100, 8, 2, seed=0)
    assert got.shape == (100, 2)
    assert torch.equal(got[: len(ids)], ids) and torch.equal(got[len(ids): 2 * len(ids)][: 100 - len(ids)],
                                                              ids[: min(len(ids), 100 - len(ids))])
    assert spec.identity().startswith("trace:sha256=")
    with pytest.raises(InvalidInputError, match="k=2"):
        spec.load_trace(8, topk=4)
    with pytest.raises(InvalidInputError, match=r"outside \[0, 4\)"):
        spec.load_trace(4, topk=2)


def test_bad_traces_are_clear_errors(tmp_path):
    floats = tmp_path / "floats.pt"
    torch.save(torch.rand(4, 2), floats)
    with pytest.raises(InvalidInputError, match="int tensor"):
        RoutingSpec.parse(f"trace:{floats}").load_trace(8, 2)
    with pytest.raises(InvalidInputError, match="does not exist"):
        RoutingSpec.parse(f"trace:{tmp_path / 'missing.pt'}").load_trace(8, 2)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(InvalidInputError, match="cannot read"):
        RoutingSpec.parse(f"trace:{junk}").load_trace(8, 2)
