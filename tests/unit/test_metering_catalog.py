"""The model catalog in metering's database: seeding from the file, admin changes, the version counter.

Runs on a real SQLite file here; ``tests/integration/test_postgres_store.py`` runs every test of this module
again on PostgreSQL (it overrides the ``database_url`` fixture).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from inferplane.assets import CATALOG
from inferplane.common.catalog import catalog_from_data, load_catalog, read_entries
from inferplane.common.errors import FailedPrecondition, InvalidArgument, NotFound
from inferplane.common.money import PriceNanos
from inferplane.metering.main import seed_catalog, seed_prices
from inferplane.metering.store import MeteringStore, UsageRow

SECRET = b"catalog-test-secret-0123456789abcdef"
FINETUNE_PRICE = PriceNanos(input_per_million=1_000_000_000, output_per_million=2_000_000_000, per_request=1_000)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'metering.db'}"


@pytest.fixture
def seeded(database_url: str) -> Iterator[MeteringStore]:
    s = MeteringStore(database_url, SECRET)
    s.migrate()
    seed_prices(s, CATALOG)
    seed_catalog(s, CATALOG)
    yield s
    s.close()


def test_the_first_start_seeds_every_model_of_the_file_and_a_second_changes_nothing(seeded: MeteringStore) -> None:
    version, models = seeded.catalog()
    in_file = [m.id for m in load_catalog(CATALOG).models]
    assert version == len(in_file)  # one change per model
    assert [m.id for m in models] == in_file  # the file's order
    tiny = models[0]
    assert (tiny.versions, tiny.version, tiny.source) == ({1: "tiny-llama"}, 1, "catalog")
    assert tiny.spec["tokenizer"] == "models/tiny-llama"  # as written: each router resolves it itself
    assert "prices" not in tiny.spec  # prices live in the price table, seeded as before
    assert seeded.current_price("tiny-llama") is not None
    seed_catalog(seeded, CATALOG)
    assert seeded.catalog_version() == len(in_file)  # a second seed changes nothing


def test_the_stored_catalog_builds_the_same_catalog_as_the_file(seeded: MeteringStore) -> None:
    _, models = seeded.catalog()
    built = catalog_from_data({"models": [m.entry() for m in models]}, CATALOG.parent)
    from_file = load_catalog(CATALOG)
    for model in from_file.models:
        assert built.get(model.id) == model.model_copy(update={"prices": None})


def test_register_a_second_id_for_a_deployed_triton_model(seeded: MeteringStore) -> None:
    before = seeded.catalog_version()
    entry, version = seeded.create_model("my-finetune", {"owned_by": "acme"}, {1: "tiny-llama"},
                                         price=FINETUNE_PRICE)
    assert version == before + 1
    assert entry.triton_model == "tiny-llama"
    # settings left out are the deployed model's (its tokenizer, its context length)
    assert entry.spec["tokenizer"] == "models/tiny-llama" and entry.spec["context_length"] == 512
    assert entry.spec["owned_by"] == "acme"
    price = seeded.current_price("my-finetune")
    assert price is not None and price.price.per_request == 1_000 and price.source == "admin"
    with pytest.raises(FailedPrecondition, match="already exists"):
        seeded.create_model("my-finetune", {}, {1: "tiny-llama"})
    assert seeded.catalog_version() == version


@pytest.mark.parametrize(("spec", "versions", "param"), [
    ({"tokenizer": "x", "colour": "red"}, {1: "m"}, "spec"),
    ({"tokenizer": "x", "context_length": -1}, {1: "m"}, "context_length"),
    ({"tokenizer": "x"}, {}, "versions"),
    ({"tokenizer": "x"}, {0: "m"}, "versions"),
    ({}, {1: "not-deployed"}, "tokenizer"),  # nothing to copy the tokenizer from: it must be given
])
def test_invalid_models_are_refused_and_change_nothing(seeded: MeteringStore, spec: dict[str, object],
                                                       versions: dict[int, str], param: str) -> None:
    before = seeded.catalog_version()
    with pytest.raises(InvalidArgument) as caught:
        seeded.create_model("bad-model", spec, versions)
    assert caught.value.param == param
    assert seeded.catalog_version() == before
    assert "bad-model" not in [m.id for m in seeded.catalog()[1]]


def test_update_settings_versions_and_price(seeded: MeteringStore) -> None:
    seeded.create_model("my-finetune", {}, {1: "tiny-llama"}, price=FINETUNE_PRICE)
    v0 = seeded.catalog_version()
    entry, v1 = seeded.update_model("my-finetune", spec={"context_length": 256})
    assert (entry.spec["context_length"], v1) == (256, v0 + 1)
    entry, v2 = seeded.update_model("my-finetune", versions={2: "tiny-llama-v2"}, serving=2)
    assert (entry.versions, entry.version, entry.triton_model, v2) == ({1: "tiny-llama", 2: "tiny-llama-v2"}, 2,
                                                                       "tiny-llama-v2", v1 + 1)
    with pytest.raises(InvalidArgument, match="the one served"):
        seeded.update_model("my-finetune", remove_versions=(2,))
    entry, v3 = seeded.update_model("my-finetune", serving=1, remove_versions=(2,))
    assert (entry.versions, entry.version) == ({1: "tiny-llama"}, 1)
    _, same = seeded.update_model("my-finetune", spec={"context_length": 256})
    assert same == v3  # nothing changed: the version stays
    _, v4 = seeded.update_model("my-finetune", price=PriceNanos(per_request=5_000))
    current = seeded.current_price("my-finetune")
    assert v4 == v3 + 1 and current is not None and current.price.per_request == 5_000
    entry, _ = seeded.update_model("my-finetune", spec={"context_length": None})  # null: back to the default
    assert "context_length" not in entry.spec
    with pytest.raises(NotFound):
        seeded.update_model("no-such-model", spec={"context_length": 8})


def test_delete_keeps_prices_and_the_seed_does_not_bring_it_back(seeded: MeteringStore) -> None:
    price_before = seeded.current_price("tiny-llama")
    _, version = seeded.delete_model("tiny-llama")
    assert "tiny-llama" not in [m.id for m in seeded.catalog()[1]]
    assert seeded.current_price("tiny-llama") == price_before
    seed_catalog(seeded, CATALOG)  # an admin deleted it: the file no longer has a say
    assert seeded.catalog()[0] == version and "tiny-llama" not in [m.id for m in seeded.catalog()[1]]
    with pytest.raises(NotFound):
        seeded.delete_model("tiny-llama")
    entry, _ = seeded.create_model("tiny-llama", {"tokenizer": "models/tiny-llama"}, {1: "tiny-llama"})
    assert entry.source == "admin" and "tiny-llama" in [m.id for m in seeded.catalog()[1]]


def test_an_edit_of_the_file_reaches_models_no_admin_changed(seeded: MeteringStore, tmp_path: Path) -> None:
    seeded.update_model("all-minilm-l6-v2", spec={"owned_by": "admin-says"})
    entries = read_entries(CATALOG)
    for e in entries:
        e["context_length"] = 128
    entries.append({**entries[0], "id": "from-the-file"})
    edited = tmp_path / "catalog.yaml"
    edited.write_text(yaml.safe_dump({"models": entries}))
    seed_catalog(seeded, edited)
    models = {m.id: m for m in seeded.catalog()[1]}
    assert models["tiny-llama"].spec["context_length"] == 128
    assert models["all-minilm-l6-v2"].spec["context_length"] == 512  # the admin's change wins
    assert models["from-the-file"].spec["context_length"] == 128


def test_the_version_counter_only_grows_under_concurrent_changes(seeded: MeteringStore) -> None:
    seen: list[int] = []
    lock = threading.Lock()
    before = seeded.catalog_version()

    def register(i: int) -> None:
        _, version = seeded.create_model(f"m-{i}", {}, {1: "tiny-llama"})
        with lock:
            seen.append(version)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(before + 1, before + 9))  # every change its own version, none lost or repeated


def test_usage_records_keep_the_model_version(seeded: MeteringStore) -> None:
    key, _ = seeded.create_key("app")
    row = UsageRow(request_id="r1", key_id=key.key_id, model="tiny-llama", prompt_tokens=3, completion_tokens=4,
                   finish_reason="stop", latency_ms=5, created_at=datetime.now(UTC), model_version=2)
    seeded.record_usage(row)
    [stored] = seeded.list_usage()
    assert stored.model_version == 2
    with pytest.raises(InvalidArgument):
        UsageRow(request_id="r2", key_id=key.key_id, model="m", prompt_tokens=0, completion_tokens=0,
                 finish_reason="stop", latency_ms=0, created_at=datetime.now(UTC), model_version=-1)
