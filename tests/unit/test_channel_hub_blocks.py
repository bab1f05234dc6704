"""The LLM's channel hub reports its prefix cache's blocks (precise cache-aware routing): a snapshot to each new
attach, the changes after, in the frames (``modeling/channel.py``). Triton's ``pb_utils`` is a stand-in here that
records what would be sent; the hub is the code under test (the real model on real Triton:
tests/integration/test_prefix_routing.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from inferplane.modeling.channel import ChannelHub, ResponseCounter
from inferplane.modeling.contract import LLMChannel


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array


class Response:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: Any = None) -> None:
        self.tensors = {t.name: t.array for t in output_tensors or []}


class Sender:
    def __init__(self) -> None:
        self.sent: list[Response] = []

    def send(self, response: Response | None = None, flags: int = 0) -> None:
        if response is not None:
            self.sent.append(response)


class Request:
    def __init__(self, channel: str) -> None:
        self.channel, self.sender = channel, Sender()

    def get_response_sender(self) -> Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return False


class Metric:
    def increment(self, n: float) -> None: ...


class Family:
    COUNTER = 0

    def __init__(self, **_: Any) -> None: ...

    def Metric(self, labels: dict[str, str]) -> Metric:  # pb_utils' name
        return Metric()


pb = SimpleNamespace(Tensor=Tensor, InferenceResponse=Response, MetricFamily=Family,
                     TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
                     get_input_tensor_by_name=lambda request, name: None)  # an attach: channel id only


def attach(hub: ChannelHub, name: str) -> Sender:
    request = Request(name)
    hub.handle(request, name, start=lambda *_: None)
    return request.sender


def blocks(response: Response) -> tuple[bool, list[int], list[int]]:
    t = response.tensors
    return (LLMChannel.BLOCKS_RESET.name in t, sorted(t.get(LLMChannel.BLOCKS_STORED.name, np.zeros(0)).tolist()),
            sorted(t.get(LLMChannel.BLOCKS_REMOVED.name, np.zeros(0)).tolist()))


def hub(publishes: bool = True) -> ChannelHub:
    return ChannelHub(pb, ResponseCounter(pb, "m"), on_cancel=lambda key: None, publishes_blocks=publishes)


def test_an_attach_gets_the_whole_set_then_the_changes() -> None:
    h = hub()
    first = attach(h, "one")
    h.flush()
    assert [blocks(r) for r in first.sent] == [(True, [], [])]  # an empty cache, said so at once
    big = 2**64 - 5  # hashes are unsigned 64-bit
    h.blocks([1, 2, big], [])
    h.blocks([3], [1])
    h.flush()
    assert blocks(first.sent[-1]) == (False, [2, 3, big], [1])
    assert first.sent[-1].tensors[LLMChannel.BLOCKS_STORED.name].dtype == np.dtype("<u8")
    second = attach(h, "two")
    h.blocks([4], [2])
    h.flush()
    assert blocks(second.sent[-1]) == (True, [3, 4, big], [])  # the snapshot, with the change in it
    assert blocks(first.sent[-1]) == (False, [4], [2])
    h.blocks([], [], reset=True)  # the cache was emptied (a new scheduler after a failed step)
    h.flush()
    assert blocks(first.sent[-1]) == blocks(second.sent[-1]) == (True, [], [])
    sent = len(first.sent)
    h.flush()
    assert len(first.sent) == sent, "no news, no frame"


def test_a_model_without_a_prefix_cache_reports_nothing() -> None:
    h = hub(publishes=False)
    sender = attach(h, "one")
    h.blocks([1], [])
    h.flush()
    assert sender.sent == []
