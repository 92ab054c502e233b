"""Request models, error shaping and streaming deltas (no model, no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvcompress.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaTracker,
    guess_param,
    validation_error,
)


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


def test_guess_param_picks_the_first_named_field():
    fields = ("compression_rate", "max_cache_tokens", "policy")
    assert (
        guess_param("give compression_rate or max_cache_tokens, not both", fields)
        == "compression_rate"
    )
    assert guess_param("nothing here", fields) is None


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
