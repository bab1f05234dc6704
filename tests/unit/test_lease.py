"""A request's lease: admitted on entry; on exit one usage record, settled and stamped, or the reservation back.

The admission stands in as a fake (these tests are about the lease's own bookkeeping; the real admission against
a real metering is in ``tests/integration/test_admission.py``); the queue gate and the recorder are the real ones.
"""

from __future__ import annotations

import asyncio

import pytest

from inferplane.common.catalog import CatalogModel
from inferplane.common.money import PriceNanos
from inferplane.router.admission import Counted, Ticket
from inferplane.router.capacity import ModelGate, Overloaded
from inferplane.router.clients import KeyInfo
from inferplane.router.lease import Clock, Lease
from inferplane.router.usage import UsageRecorder
from inferplane.v1 import metering_pb2

MODEL = CatalogModel(id="m", triton_model="m", tokenizer="/tmp", context_length=100)
KEY = KeyInfo(key_id="k1", name="k1", tenant_id="t1")
PRICE = PriceNanos(input_per_million=1_000_000_000, output_per_million=2_000_000_000, version=7,
                   cached_input_per_million=250_000_000)


class FakeAdmission:
    def __init__(self) -> None:
        self.released: list[str] = []

    async def admit(self, key: KeyInfo, model: CatalogModel, prompt_tokens: int, max_tokens: int, *,
                    request_id: str | None = None, tier: str = "default", counted: Counted | None = None) -> Ticket:
        return Ticket(key, model.id, f"res-{request_id}", PRICE.cost(prompt_tokens, max_tokens), PRICE,
                      (("x-ratelimit-remaining-requests", "4"),))

    def settle(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        assert ticket.price is not None
        return ticket.price.cost(prompt_tokens, completion_tokens, cached_tokens)

    async def release(self, ticket: Ticket) -> None:
        self.released.append(ticket.reservation_id)


class FakeMetering:
    def __init__(self) -> None:
        self.records: list[metering_pb2.UsageRecord] = []

    async def record_usage(self, record: metering_pb2.UsageRecord, timeout: float) -> None:
        await asyncio.sleep(0)  # stored a step later, as over a socket
        self.records.append(record)


def lease(gate: ModelGate, admission: FakeAdmission, metering: FakeMetering) -> Lease:
    return Lease(admission, gate, UsageRecorder(metering), key=KEY, model=MODEL,  # type: ignore[arg-type]
                 request_id="r1", operation="chat", clock=Clock.start(None, 60.0), prompt_tokens=3, max_tokens=10)


def gate(capacity: int = 1, max_queue: int = 0) -> ModelGate:
    return ModelGate("m", lambda: capacity, max_queue=max_queue, queue_timeout_s=1.0)


async def test_a_finished_request_leaves_one_settled_record_before_the_lease_is_left() -> None:
    g, adm, metering = gate(), FakeAdmission(), FakeMetering()
    async with lease(g, adm, metering) as it:
        assert it.headers == (("x-ratelimit-remaining-requests", "4"),) and g.running == 1
        it.began()
        it.tokens(2)
        it.finished("length", prompt_tokens=3, completion_tokens=4)  # the model's counts win over the router's
    [record] = metering.records  # stored (not merely started) when the block is left
    assert (record.request_id, record.prompt_tokens, record.completion_tokens, record.finish_reason) == (
        "r1", 3, 4, "length")
    assert (record.reservation_id, record.price_version, record.tenant_id) == ("res-r1", 7, "t1")
    assert record.cost_nanodollars == it.cost == PRICE.cost(3, 4)
    assert adm.released == [] and g.running == 0


async def test_cached_prompt_tokens_go_on_the_record_and_are_charged_at_the_cached_price() -> None:
    g, adm, metering = gate(), FakeAdmission(), FakeMetering()
    async with lease(g, adm, metering) as it:
        it.began()
        it.tokens(4)
        it.finished("stop", prompt_tokens=3, completion_tokens=4, cached_tokens=2)
    [record] = metering.records
    assert record.cached_tokens == 2
    # 1 prompt token at $1/M, 2 cached at $0.25/M, 4 completion tokens at $2/M: 1,000 + 500 + 8,000 nano-dollars
    assert record.cost_nanodollars == it.cost == 9_500 < PRICE.cost(3, 4)


async def test_a_request_that_never_reached_an_executor_releases_its_reservation_and_leaves_no_record() -> None:
    g, adm, metering = gate(), FakeAdmission(), FakeMetering()
    with pytest.raises(ConnectionError):
        async with lease(g, adm, metering):
            raise ConnectionError("the caller left before the executor was asked")  # on_admitted failed
    assert adm.released == ["res-r1"] and metering.records == [] and g.running == 0


async def test_a_full_queue_refuses_and_gives_the_reservation_back() -> None:
    g, adm, metering = gate(capacity=1, max_queue=0), FakeAdmission(), FakeMetering()
    async with lease(g, adm, metering) as first:
        with pytest.raises(Overloaded):
            async with lease(g, adm, metering):
                pass
        assert adm.released == ["res-r1"] and g.running == 1  # the refused one's; the first keeps its slot
        first.began()
        first.finished("stop")
    assert len(metering.records) == 1 and g.running == 0


@pytest.mark.parametrize(("error", "finish"), [(asyncio.CancelledError, "cancelled"), (GeneratorExit, "cancelled"),
                                              (RuntimeError, "error")])
async def test_work_cut_short_is_recorded_once_with_what_was_generated(error: type[BaseException],
                                                                       finish: str) -> None:
    g, adm, metering = gate(), FakeAdmission(), FakeMetering()
    recorder = UsageRecorder(metering)  # type: ignore[arg-type]
    it = Lease(adm, g, recorder, key=KEY, model=MODEL, request_id="r1",  # type: ignore[arg-type]
               operation="chat", clock=Clock.start(None, 60.0), prompt_tokens=3, max_tokens=10)
    with pytest.raises(error):
        async with it:
            it.began()
            it.tokens(2)
            raise error()
    await recorder.drain()  # a cut request does not wait for its record: it is written in the background
    [record] = metering.records
    assert (record.completion_tokens, record.finish_reason, record.cost_nanodollars) == (2, finish, PRICE.cost(3, 2))
    assert adm.released == [] and g.running == 0


async def test_a_lease_is_entered_once() -> None:
    it = lease(gate(capacity=2), FakeAdmission(), FakeMetering())
    async with it:
        pass
    with pytest.raises(AssertionError, match="entered once"):
        async with it:
            pass
