import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_SCOPE_UNSPECIFIED: _ClassVar[BudgetScope]
    BUDGET_SCOPE_KEY: _ClassVar[BudgetScope]
    BUDGET_SCOPE_TENANT: _ClassVar[BudgetScope]

class BudgetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_PERIOD_UNSPECIFIED: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_DAILY: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_MONTHLY: _ClassVar[BudgetPeriod]

class RecordOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_OUTCOME_UNSPECIFIED: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_CREATED: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_DUPLICATE: _ClassVar[RecordOutcome]
    RECORD_OUTCOME_INVALID: _ClassVar[RecordOutcome]
BUDGET_SCOPE_UNSPECIFIED: BudgetScope
BUDGET_SCOPE_KEY: BudgetScope
BUDGET_SCOPE_TENANT: BudgetScope
BUDGET_PERIOD_UNSPECIFIED: BudgetPeriod
BUDGET_PERIOD_DAILY: BudgetPeriod
BUDGET_PERIOD_MONTHLY: BudgetPeriod
RECORD_OUTCOME_UNSPECIFIED: RecordOutcome
RECORD_OUTCOME_CREATED: RecordOutcome
RECORD_OUTCOME_DUPLICATE: RecordOutcome
RECORD_OUTCOME_INVALID: RecordOutcome

class VerifyKeyRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class VerifyKeyResponse(_message.Message):
    __slots__ = ("key_id", "name", "tenant_id", "models", "scopes", "requests_per_minute", "tokens_per_minute", "has_budget", "expires_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    HAS_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    name: str
    tenant_id: str
    models: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    requests_per_minute: int
    tokens_per_minute: int
    has_budget: bool
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., name: _Optional[str] = ..., tenant_id: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., has_budget: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("request_id", "key_id", "model", "prompt_tokens", "completion_tokens", "finish_reason", "latency_ms", "time_to_first_token_ms", "created_at", "tenant_id", "cost_nanodollars", "price_version", "reservation_id", "cached", "cancelled", "model_version", "trace_id", "cached_tokens", "service_tier", "tier_multiplier")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    COST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: int
    time_to_first_token_ms: int
    created_at: _timestamp_pb2.Timestamp
    tenant_id: str
    cost_nanodollars: int
    price_version: int
    reservation_id: str
    cached: bool
    cancelled: bool
    model_version: int
    trace_id: str
    cached_tokens: int
    service_tier: str
    tier_multiplier: str
    def __init__(self, request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., latency_ms: _Optional[int] = ..., time_to_first_token_ms: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant_id: _Optional[str] = ..., cost_nanodollars: _Optional[int] = ..., price_version: _Optional[int] = ..., reservation_id: _Optional[str] = ..., cached: _Optional[bool] = ..., cancelled: _Optional[bool] = ..., model_version: _Optional[int] = ..., trace_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., service_tier: _Optional[str] = ..., tier_multiplier: _Optional[str] = ...) -> None: ...

class RecordUsageRequest(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: UsageRecord
    def __init__(self, record: _Optional[_Union[UsageRecord, _Mapping]] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("created", "cost_nanodollars")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    COST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    created: bool
    cost_nanodollars: int
    def __init__(self, created: _Optional[bool] = ..., cost_nanodollars: _Optional[int] = ...) -> None: ...

class RecordUsageBatchRequest(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ...) -> None: ...

class RecordUsageBatchResponse(_message.Message):
    __slots__ = ("outcomes", "errors")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedScalarFieldContainer[RecordOutcome]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[RecordOutcome, str]]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ListUsageRequest(_message.Message):
    __slots__ = ("key_id", "limit", "tenant_id", "start", "end")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    limit: int
    tenant_id: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., limit: _Optional[int] = ..., tenant_id: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListUsageResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ...) -> None: ...

class Price(_message.Message):
    __slots__ = ("model", "input_per_million_nanodollars", "output_per_million_nanodollars", "per_request_nanodollars", "version", "effective_at", "source", "cached_input_per_million_nanodollars")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_per_million_nanodollars: int
    output_per_million_nanodollars: int
    per_request_nanodollars: int
    version: int
    effective_at: _timestamp_pb2.Timestamp
    source: str
    cached_input_per_million_nanodollars: int
    def __init__(self, model: _Optional[str] = ..., input_per_million_nanodollars: _Optional[int] = ..., output_per_million_nanodollars: _Optional[int] = ..., per_request_nanodollars: _Optional[int] = ..., version: _Optional[int] = ..., effective_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., cached_input_per_million_nanodollars: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("reservation_id", "key_id", "model", "prompt_tokens", "max_tokens", "tier_multiplier")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIER_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    tier_multiplier: str
    def __init__(self, reservation_id: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., tier_multiplier: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reserved_nanodollars", "price")
    RESERVED_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    reserved_nanodollars: int
    price: Price
    def __init__(self, reserved_nanodollars: _Optional[int] = ..., price: _Optional[_Union[Price, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("include_history",)
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    include_history: bool
    def __init__(self, include_history: _Optional[bool] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("prices",)
    PRICES_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    def __init__(self, prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ...) -> None: ...

class GetUsageSummaryRequest(_message.Message):
    __slots__ = ("key_id", "tenant_id", "start", "end")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant_id: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UsageSummaryRow(_message.Message):
    __slots__ = ("day", "key_id", "tenant_id", "model", "requests", "prompt_tokens", "completion_tokens", "cost_nanodollars", "cancelled_requests", "cached_tokens", "service_tier")
    DAY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    day: str
    key_id: str
    tenant_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nanodollars: int
    cancelled_requests: int
    cached_tokens: int
    service_tier: str
    def __init__(self, day: _Optional[str] = ..., key_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., model: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_nanodollars: _Optional[int] = ..., cancelled_requests: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., service_tier: _Optional[str] = ...) -> None: ...

class GetUsageSummaryResponse(_message.Message):
    __slots__ = ("rows", "start", "end")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageSummaryRow]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageSummaryRow, _Mapping]]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApiKeyInfo(_message.Message):
    __slots__ = ("key_id", "name", "tenant_id", "models", "scopes", "requests_per_minute", "tokens_per_minute", "created_at", "expires_at", "revoked_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    name: str
    tenant_id: str
    models: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    requests_per_minute: int
    tokens_per_minute: int
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., name: _Optional[str] = ..., tenant_id: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("scope", "subject_id", "limit_nanodollars", "period", "period_start", "spent_nanodollars", "reserved_nanodollars")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    SPENT_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    scope: BudgetScope
    subject_id: str
    limit_nanodollars: int
    period: BudgetPeriod
    period_start: _timestamp_pb2.Timestamp
    spent_nanodollars: int
    reserved_nanodollars: int
    def __init__(self, scope: _Optional[_Union[BudgetScope, str]] = ..., subject_id: _Optional[str] = ..., limit_nanodollars: _Optional[int] = ..., period: _Optional[_Union[BudgetPeriod, str]] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spent_nanodollars: _Optional[int] = ..., reserved_nanodollars: _Optional[int] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "tenant_id", "models", "scopes", "expires_at", "requests_per_minute", "tokens_per_minute", "budget")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant_id: str
    models: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at: _timestamp_pb2.Timestamp
    requests_per_minute: int
    tokens_per_minute: int
    budget: Budget
    def __init__(self, name: _Optional[str] = ..., tenant_id: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKeyInfo
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKeyInfo, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyInfo, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class SetPriceRequest(_message.Message):
    __slots__ = ("model", "input_per_million_nanodollars", "output_per_million_nanodollars", "per_request_nanodollars", "cached_input_per_million_nanodollars")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_per_million_nanodollars: int
    output_per_million_nanodollars: int
    per_request_nanodollars: int
    cached_input_per_million_nanodollars: int
    def __init__(self, model: _Optional[str] = ..., input_per_million_nanodollars: _Optional[int] = ..., output_per_million_nanodollars: _Optional[int] = ..., per_request_nanodollars: _Optional[int] = ..., cached_input_per_million_nanodollars: _Optional[int] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("scope", "subject_id", "limit_nanodollars", "period")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    scope: BudgetScope
    subject_id: str
    limit_nanodollars: int
    period: BudgetPeriod
    def __init__(self, scope: _Optional[_Union[BudgetScope, str]] = ..., subject_id: _Optional[str] = ..., limit_nanodollars: _Optional[int] = ..., period: _Optional[_Union[BudgetPeriod, str]] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("scope",)
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    scope: BudgetScope
    def __init__(self, scope: _Optional[_Union[BudgetScope, str]] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ...) -> None: ...

class PriceAmounts(_message.Message):
    __slots__ = ("input_per_million_nanodollars", "output_per_million_nanodollars", "per_request_nanodollars", "cached_input_per_million_nanodollars")
    INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_PER_MILLION_NANODOLLARS_FIELD_NUMBER: _ClassVar[int]
    input_per_million_nanodollars: int
    output_per_million_nanodollars: int
    per_request_nanodollars: int
    cached_input_per_million_nanodollars: int
    def __init__(self, input_per_million_nanodollars: _Optional[int] = ..., output_per_million_nanodollars: _Optional[int] = ..., per_request_nanodollars: _Optional[int] = ..., cached_input_per_million_nanodollars: _Optional[int] = ...) -> None: ...

class CatalogModel(_message.Message):
    __slots__ = ("id", "spec_json", "versions", "version", "price", "source", "created_at", "updated_at")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec_json: str
    versions: _containers.ScalarMap[int, str]
    version: int
    price: Price
    source: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., spec_json: _Optional[str] = ..., versions: _Optional[_Mapping[int, str]] = ..., version: _Optional[int] = ..., price: _Optional[_Union[Price, _Mapping]] = ..., source: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListCatalogRequest(_message.Message):
    __slots__ = ("if_newer_than",)
    IF_NEWER_THAN_FIELD_NUMBER: _ClassVar[int]
    if_newer_than: int
    def __init__(self, if_newer_than: _Optional[int] = ...) -> None: ...

class ListCatalogResponse(_message.Message):
    __slots__ = ("version", "unchanged", "models")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    version: int
    unchanged: bool
    models: _containers.RepeatedCompositeFieldContainer[CatalogModel]
    def __init__(self, version: _Optional[int] = ..., unchanged: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[CatalogModel, _Mapping]]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("id", "spec_json", "versions", "version", "price")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec_json: str
    versions: _containers.ScalarMap[int, str]
    version: int
    price: PriceAmounts
    def __init__(self, id: _Optional[str] = ..., spec_json: _Optional[str] = ..., versions: _Optional[_Mapping[int, str]] = ..., version: _Optional[int] = ..., price: _Optional[_Union[PriceAmounts, _Mapping]] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("id", "spec_json", "versions", "remove_versions", "version", "price")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec_json: str
    versions: _containers.ScalarMap[int, str]
    remove_versions: _containers.RepeatedScalarFieldContainer[int]
    version: int
    price: PriceAmounts
    def __init__(self, id: _Optional[str] = ..., spec_json: _Optional[str] = ..., versions: _Optional[_Mapping[int, str]] = ..., remove_versions: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., price: _Optional[_Union[PriceAmounts, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ModelChange(_message.Message):
    __slots__ = ("model", "catalog_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: CatalogModel
    catalog_version: int
    def __init__(self, model: _Optional[_Union[CatalogModel, _Mapping]] = ..., catalog_version: _Optional[int] = ...) -> None: ...
