"""Request models, error shaping and streaming deltas (no model, no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvcompress.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from kvcompress.entrypoints.openai.responses import DeltaTracker


def error_for(model, body) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value.errors())


def test_union_errors_become_one_message():
    err = error_for(CompletionRequest, {"prompt": "x", "stop": 5})
    assert err.param == "stop"
    assert err.message == "stop: Input should be a valid string or a valid list, got int 5"


def test_nested_params_are_dotted():
    err = error_for(ChatCompletionRequest, {"messages": [{"role": "user", "content": 3}]})
    assert err.param == "messages.0.content"
    assert "only text" in err.message


def test_strict_types():
    for body in ({"max_tokens": "5"}, {"max_tokens": 5.0}, {"stream": 1}, {"seed": True}):
        err = error_for(CompletionRequest, {"prompt": "x", **body})
        assert err.param == next(iter(body))


def test_unknown_fields_are_ignored_and_compression_fields_collected():
    req = CompletionRequest.model_validate(
        {"prompt": "x", "whatever": [1], "compression_rate": 4, "protected_window": 0}
    )
    assert req.compression_overrides() == {"compression_rate": 4.0, "protected_window": 0}


def test_chat_max_completion_tokens_wins():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        }
    )
    assert req.sampling_params(100).max_tokens == 7
    assert req.sampling_params(100).temperature == 1.0  # OpenAI's default


def test_text_parts_and_developer_role():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert [m.as_template_message() for m in req.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
    ]


def test_compression_fields_follow_the_schema_and_null_clears():
    from kvcompress.compress import compression_fields

    names = {spec.name for spec in compression_fields()}
    assert names <= set(CompletionRequest.model_fields)
    body = {"prompt": "x", "compression_rate": 4, "compression_interval": None}
    given = CompletionRequest.model_validate(body).compression_overrides()
    assert given == {"compression_rate": 4.0, "compression_interval": None}
    assert CompletionRequest.model_validate({"prompt": "x"}).compression_overrides() == {}


def test_sampling_errors_name_their_field():
    body = CompletionRequest.model_validate({"prompt": "x", "top_k": 0, "max_tokens": 1})
    assert body.sampling_params(16).max_tokens == 1
    with pytest.raises(APIError) as info:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}
        ).sampling_params(16)
    assert info.value.param == "stop" and info.value.code == "invalid_parameter"


def test_delta_tracker_holds_back_a_possible_stop_string():
    t = DeltaTracker(("###",))
    assert t.update("Hello #", False) == "Hello "
    assert t.update("Hello ##", False) == ""
    assert t.update("Hello", True) == ""  # the engine trimmed the completed stop string
    t = DeltaTracker(("###",))
    assert t.update("a #", False) == "a "
    assert t.update("a #b", False) == "#b"  # not a stop after all


def test_delta_tracker_holds_back_half_characters():
    t = DeltaTracker(())
    assert t.update("caf\ufffd", False) == "caf"
    assert t.update("café", False) == "é"
    assert t.update("café!", True) == "!"
    assert t.sent == "café!"
