"""The wire contracts of ``inferplane.common.wire``: one bearer rule, one request-id rule, finish reasons and budget
names that cover their protobuf enums, and error reasons that survive the trip through ``google.rpc.Status``."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from inferplane.common import wire
from inferplane.common.errors import (
    InferplaneError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from inferplane.gateway.errors import REASON_ERRORS, STATUS_REASONS
from inferplane.metering import budgets
from inferplane.v1 import common_pb2, metering_pb2


@pytest.mark.parametrize(("value", "key"), [
    ("Bearer sk-1", "sk-1"), ("bearer sk-1", "sk-1"), ("  BEARER   sk-1  ", "sk-1"), (b"Bearer sk-1", "sk-1"),
    (None, None), ("", None), ("   ", None), ("Bearer", None), ("Bearer   ", None), ("Basic sk-1", None),
    ("Bearer a b", None), ("Bearer a\tb", None), ("sk-1", None),
])
def test_parse_bearer(value: str | bytes | None, key: str | None) -> None:
    assert wire.parse_bearer(value) == key


def test_a_refused_key_is_missing_only_when_there_is_no_value() -> None:
    assert wire.key_refusal(None) == wire.key_refusal("  ") == wire.MISSING_KEY
    assert wire.key_refusal("Basic x") == wire.key_refusal("Bearer") == wire.MALFORMED_KEY
    assert "Authorization: Bearer YOUR_KEY" in wire.MISSING_KEY  # OpenAI's text


def test_bearer_metadata_round_trips() -> None:
    md = (("x-other", "1"), *wire.bearer_metadata("sk-9"))
    assert wire.bearer_from_metadata(md) == "sk-9"
    assert wire.bearer_from_metadata((("Authorization", "Bearer sk-9"),)) == "sk-9"  # keys are case-insensitive
    assert wire.bearer_from_metadata(()) is None and wire.bearer_from_metadata(None) is None


@pytest.mark.parametrize(("rid", "ok"), [("a", True), ("x" * 128, True), ("req-1:2/3", True), ("", False),
                                         ("x" * 129, False), ("a b", False), ("é", False), ("a\n", False)])
def test_request_id_rule(rid: str, ok: bool) -> None:
    assert wire.valid_request_id(rid) is ok
    assert wire.valid_request_id(wire.new_request_id())


def test_finish_reasons_cover_the_enum() -> None:
    named = {v for v in common_pb2.FinishReason.values() if v != common_pb2.FINISH_REASON_UNSPECIFIED}
    assert set(wire.FINISH_FROM_PB) == named
    assert set(wire.FINISH_TO_PB) == set(wire.FINISH_REASONS)
    assert all(wire.FINISH_FROM_PB[wire.FINISH_TO_PB[name]] == name for name in wire.FINISH_REASONS)


def test_budget_names_are_metering_s_and_cover_the_enums() -> None:
    assert tuple(wire.BUDGET_SCOPES) == budgets.SCOPES and tuple(wire.BUDGET_PERIODS) == budgets.PERIODS
    assert set(wire.BUDGET_SCOPE_NAMES) == set(metering_pb2.BudgetScope.values()) - {0}
    assert set(wire.BUDGET_PERIOD_NAMES) == set(metering_pb2.BudgetPeriod.values()) - {0}
    assert wire.DEFAULT_BUDGET_PERIOD in wire.BUDGET_PERIODS


def test_every_reason_has_an_openai_answer_and_a_name() -> None:
    reasons = set(common_pb2.ErrorReason.values()) - {common_pb2.ERROR_REASON_UNSPECIFIED}
    assert set(REASON_ERRORS) == reasons
    for reason in reasons:
        assert wire.reason_from_name(wire.reason_name(reason)) == reason
    assert wire.reason_from_name("ERROR_REASON_FROM_A_NEWER_SERVER") == wire.REASON_UNSPECIFIED
    assert set(STATUS_REASONS.values()) <= reasons


def test_error_status_is_what_grpc_status_reads() -> None:
    status = wire.error_status(grpc.StatusCode.NOT_FOUND, "no such model", wire.REASON_MODEL_NOT_FOUND, param="model")
    trailing = ((wire.REQUEST_ID, "r1"), (wire.STATUS_DETAILS, status.SerializeToString()))

    class Call:  # what rpc_status.from_call reads of a finished call
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "no such model"

        def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
            return trailing

    read = rpc_status.from_call(Call())  # type: ignore[arg-type]
    assert read is not None and read.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = wire.error_info(trailing)
    assert info is not None
    assert (info.domain, info.reason, dict(info.metadata)) == ("inferplane.dev", "ERROR_REASON_MODEL_NOT_FOUND",
                                                               {"param": "model"})


def test_error_info_ignores_other_domains_and_garbage() -> None:
    other = status_pb2.Status(code=5, message="x")
    other.details.add().Pack(error_details_pb2.ErrorInfo(reason="SERVICE_DISABLED", domain="googleapis.com"))
    assert wire.error_info(((wire.STATUS_DETAILS, other.SerializeToString()),)) is None
    assert wire.error_info(((wire.STATUS_DETAILS, b"\xff\x00garbage"),)) is None
    assert wire.error_info(((wire.STATUS_DETAILS, "not bytes"),)) is None
    assert wire.error_info(()) is None


def test_domain_errors_carry_a_reason_by_default_and_by_raise() -> None:
    assert InferplaneError("x").reason == wire.REASON_INTERNAL
    assert InvalidArgument("x", param="top_p").reason == wire.REASON_INVALID_REQUEST
    assert Unauthenticated("x").reason == wire.REASON_INVALID_API_KEY
    # NOT_FOUND no longer means "model" by convention: what is missing is what param names
    assert NotFound("x", param="model").reason == wire.REASON_MODEL_NOT_FOUND
    assert NotFound("x", param="key_id").reason == wire.REASON_NOT_FOUND
    assert NotFound("x").reason == wire.REASON_NOT_FOUND
    assert NotFound("x", reason=wire.REASON_MODEL_NOT_FOUND).reason == wire.REASON_MODEL_NOT_FOUND
    assert InvalidArgument("x", reason=wire.REASON_CONTEXT_LENGTH_EXCEEDED).reason == \
        wire.REASON_CONTEXT_LENGTH_EXCEEDED
    # RESOURCE_EXHAUSTED: a rate limit unless said otherwise, also by the older trailer set after __init__
    assert ResourceExhausted("x").reason == wire.REASON_RATE_LIMITED
    quota = ResourceExhausted("x")
    quota.metadata = ((wire.ERROR_CODE, wire.INSUFFICIENT_QUOTA),)
    assert quota.reason == wire.REASON_INSUFFICIENT_QUOTA
    quota.reason = wire.REASON_OVERLOADED
    assert quota.reason == wire.REASON_OVERLOADED


def test_every_reason_has_its_constant_in_wire() -> None:
    for name, value in common_pb2.ErrorReason.items():
        assert getattr(wire, "REASON_" + name.removeprefix("ERROR_REASON_")) == value, name


def test_the_router_applies_the_gateway_s_request_id_rule() -> None:
    from inferplane.router.service import request_id_from

    assert request_id_from(((wire.REQUEST_ID, "req-1"),)) == "req-1"
    assert wire.valid_request_id(request_id_from(()))
    for bad in ("a b", "x" * 129, "é", ""):  # spaces and non-ASCII used to pass the router's own check
        with pytest.raises(InvalidArgument) as err:
            request_id_from(((wire.REQUEST_ID, bad),))
        assert (err.value.param, err.value.message) == (wire.REQUEST_ID, wire.BAD_REQUEST_ID)
