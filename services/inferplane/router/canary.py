"""Canary traffic: which version of a model serves a request, when the model splits its traffic.

A request's bucket is a stable hash of the model id and the caller's ``user`` (OpenAI's field), else of its
request id: ``sha256(model id, NUL, key)`` read as a big integer, mod 100. The buckets are laid out over the
versions in version order, each taking as many as its weight (``{1: 90, 2: 10}``: buckets 0-89 are version 1,
90-99 version 2). So one user keeps landing on the same version while the weights stand, and raising a canary's
weight only moves users onto it (a bucket below the new boundary never changes side). The model id is in the
hash so that one user is not the canary of every model at once.
"""

from __future__ import annotations

import hashlib

from inferplane.common.catalog import CatalogModel

BUCKETS = 100


def bucket(model_id: str, key: str) -> int:
    """The request's bucket, 0..99: the same for the same model and key, wherever it is computed."""
    digest = hashlib.sha256(f"{model_id}\0{key}".encode()).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose_version(traffic: dict[int, int], model_id: str, key: str) -> int:
    """The version serving ``key``'s request of ``model_id`` under ``traffic`` (version -> percent, summing to
    100: ``CatalogModel`` checked it)."""
    assert traffic and sum(traffic.values()) == BUCKETS, f"traffic must sum to {BUCKETS}: {traffic}"
    b = bucket(model_id, key)
    upto = 0
    for version, weight in sorted(traffic.items()):
        upto += weight
        if b < upto:
            return version
    raise AssertionError("unreachable: the weights sum to 100")


def serving(model: CatalogModel, key: str) -> CatalogModel:
    """``model`` as the version that serves ``key``'s request (``model`` itself when it splits no traffic)."""
    if not model.traffic:
        return model
    return model.at_version(choose_version(model.traffic, model.id, key))
