"""Canary traffic: the per-request version choice (distribution, stickiness) and the split as catalog data
(validation, promote, rollback) in metering's store and CLI."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from inferplane.assets import CATALOG
from inferplane.common.catalog import CatalogModel, catalog_from_data
from inferplane.common.errors import FailedPrecondition, InvalidArgument
from inferplane.metering.main import seed_catalog, seed_prices
from inferplane.metering.store import MeteringStore
from inferplane.router.canary import bucket, choose_version, serving

SECRET = b"canary-test-secret-0123456789abcdef"
USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.parametrize("weights", [{1: 90, 2: 10}, {1: 50, 2: 50}, {1: 70, 2: 20, 3: 10}, {1: 1, 2: 99}])
def test_ten_thousand_users_split_within_two_points_of_the_weights(weights: dict[int, int]) -> None:
    counts = Counter(choose_version(weights, "my-model", u) for u in USERS)
    for version, weight in weights.items():
        share = 100 * counts[version] / len(USERS)
        assert abs(share - weight) <= 2, (version, share, weight)
    assert set(counts) <= set(weights)


def test_a_user_keeps_their_version_while_the_weights_stand() -> None:
    weights = {1: 90, 2: 10}
    first = {u: choose_version(weights, "my-model", u) for u in USERS[:2000]}
    again = {u: choose_version(dict(reversed(weights.items())), "my-model", u) for u in USERS[:2000]}
    assert first == again  # the dict's order does not matter, only the weights
    assert bucket("my-model", "alice") == bucket("my-model", "alice")


def test_raising_the_canary_only_moves_users_onto_it() -> None:
    before = {u: choose_version({1: 90, 2: 10}, "m", u) for u in USERS}
    after = {u: choose_version({1: 50, 2: 50}, "m", u) for u in USERS}
    assert all(after[u] == 2 for u in USERS if before[u] == 2)
    assert sum(v == 2 for v in after.values()) > sum(v == 2 for v in before.values())


def test_zero_weight_and_all_weight() -> None:
    assert {choose_version({1: 100, 2: 0}, "m", u) for u in USERS[:500]} == {1}
    assert {choose_version({1: 0, 2: 100}, "m", u) for u in USERS[:500]} == {2}


def test_the_model_id_is_in_the_hash() -> None:
    # one user is not the canary of every model at once
    a = [choose_version({1: 50, 2: 50}, "model-a", u) for u in USERS[:1000]]
    b = [choose_version({1: 50, 2: 50}, "model-b", u) for u in USERS[:1000]]
    assert a != b


def _model(**extra: object) -> CatalogModel:
    return catalog_from_data({"models": [{"id": "m", "triton_model": "t1", "tokenizer": "x",
                                          "versions": {1: "t1", 2: "t2"}, "version": 1, **extra}]}, Path("/")).models[0]


def test_serving_picks_the_version_and_its_triton_model() -> None:
    model = _model(traffic={"1": 50, "2": 50})
    seen = {(m.version, m.triton_model) for m in (serving(model, u) for u in USERS[:200])}
    assert seen == {(1, "t1"), (2, "t2")}
    assert serving(model, "x").id == "m" and model.version == 1  # the catalog's entry is not changed
    plain = _model()
    assert serving(plain, "anyone") is plain


@pytest.mark.parametrize("traffic, why", [
    ({1: 90, 3: 10}, "does not have"), ({1: 90, 2: 20}, "sum to 110"), ({1: 110, 2: -10}, "non-negative"),
])
def test_the_catalog_entry_refuses_a_bad_split(traffic: dict[int, int], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        _model(traffic=traffic)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MeteringStore]:
    s = MeteringStore(f"sqlite:///{tmp_path / 'metering.db'}", SECRET)
    s.migrate()
    seed_prices(s, CATALOG)
    seed_catalog(s, CATALOG)
    s.create_model("canary-model", {}, {1: "tiny-llama", 2: "tiny-llama"}, serving=1)
    yield s
    s.close()


def test_a_split_is_stored_and_reaches_the_routers_catalog(store: MeteringStore) -> None:
    entry, version = store.update_model("canary-model", spec={"traffic": {"1": 90, "2": 10}})
    assert entry.spec["traffic"] == {"1": 90, "2": 10}
    _, models = store.catalog()
    built = catalog_from_data({"models": [m.entry() for m in models]}, CATALOG.parent).get("canary-model")
    assert built is not None and built.traffic == {1: 90, 2: 10}
    # the same split again changes nothing: the counter stays
    assert store.update_model("canary-model", spec={"traffic": {1: 90, 2: 10}})[1] == version


@pytest.mark.parametrize("traffic, why", [
    ({"1": 90, "3": 10}, "does not have"), ({"1": 90, "2": 20}, "sum to 110"), ({"1": 90.0, "2": 10}, "integers"),
    ({"1": "90", "2": "10"}, "integers"), ({"1": 110, "2": -10}, "non-negative"), ({"one": 100}, "version numbers"),
    ([90, 10], "object"),
])
def test_a_bad_split_is_refused_with_its_param(store: MeteringStore, traffic: object, why: str) -> None:
    before = store.catalog_version()
    with pytest.raises(InvalidArgument, match=why) as err:
        store.update_model("canary-model", spec={"traffic": traffic})
    assert err.value.param == "traffic"
    assert store.catalog_version() == before


def test_a_version_with_traffic_cannot_be_removed(store: MeteringStore) -> None:
    store.update_model("canary-model", spec={"traffic": {"1": 90, "2": 10}})
    with pytest.raises(InvalidArgument, match="does not have") as err:
        store.update_model("canary-model", remove_versions=(2,))
    assert err.value.param == "traffic"


def test_promote_sends_all_traffic_to_the_version_and_rollback_goes_back(store: MeteringStore) -> None:
    store.update_model("canary-model", spec={"traffic": {"1": 90, "2": 10}})
    entry, _ = store.promote_model("canary-model", 2)
    assert (entry.version, entry.triton_model, entry.spec.get("traffic")) == (2, "tiny-llama", None)
    entry, _ = store.promote_model("canary-model", None)  # rollback: the version below the served one
    assert (entry.version, entry.spec.get("traffic")) == (1, None)
    with pytest.raises(FailedPrecondition, match="no version to roll back to"):
        store.promote_model("canary-model", None)
    with pytest.raises(InvalidArgument) as err:
        store.promote_model("canary-model", 7)
    assert err.value.param == "version"


def test_a_new_model_does_not_inherit_another_models_split(store: MeteringStore) -> None:
    store.create_model("split", {"tokenizer": "models/tiny-llama", "context_length": 300,
                                 "traffic": {"1": 50, "2": 50}},
                       {1: "only-split-serves-this", 2: "tiny-llama"}, serving=1)
    # settings left out are copied from the model served by the same Triton model: not its split
    entry, _ = store.create_model("another", {}, {1: "only-split-serves-this"})
    assert entry.spec["context_length"] == 300 and "traffic" not in entry.spec
