import pytest

from inferplane.common.catalog import CatalogModel
from inferplane.common.errors import InvalidArgument
from inferplane.router.engine import GenerationInput, completion_budget, validate
from inferplane.v1 import common_pb2

MODEL = CatalogModel(id="m", triton_model="m", tokenizer="/tmp", context_length=100)
CHAT = [common_pb2.ChatMessage(role="user", content="hi")]


@pytest.mark.parametrize(("field", "value", "param"), [
    ("max_tokens", -1, "max_tokens"),
    ("max_tokens", 0, "max_tokens"),
    ("temperature", 2.5, "temperature"),
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -3, "top_k"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ("stop", [""], "stop"),
])
def test_out_of_range_parameters_name_their_param(field, value, param):
    inp = GenerationInput(model="m", messages=CHAT, **{field: value})
    with pytest.raises(InvalidArgument) as err:
        validate(inp, MODEL)
    assert err.value.param == param


def test_valid_request_passes():
    validate(GenerationInput(model="m", messages=CHAT, max_tokens=5, temperature=0, top_p=1, stop=["x"]), MODEL)
    validate(GenerationInput(model="m", prompt="hello"), MODEL)


def test_empty_prompt_and_messages_are_refused():
    with pytest.raises(InvalidArgument):
        validate(GenerationInput(model="m", prompt=""), MODEL)
    with pytest.raises(InvalidArgument):
        validate(GenerationInput(model="m", messages=[]), MODEL)


def test_task_not_in_catalog_is_refused():
    chat_only = MODEL.model_copy(update={"tasks": ["chat"]})
    with pytest.raises(InvalidArgument) as err:
        validate(GenerationInput(model="m", prompt="x"), chat_only)
    assert err.value.param == "model"


def test_completion_budget_fills_the_context_by_default():
    assert completion_budget(30, None, MODEL) == 70
    assert completion_budget(30, 70, MODEL) == 70
    with pytest.raises(InvalidArgument) as err:
        completion_budget(30, 71, MODEL)
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidArgument):
        completion_budget(100, None, MODEL)
