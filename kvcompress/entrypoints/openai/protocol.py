"""Request and response shapes of the OpenAI-compatible API, plus KV-Compress extras.

Known fields are typed strictly (a string is not an integer) so that a wrong type is a 400
naming the field rather than a silent coercion. Unknown fields are ignored, as OpenAI-style
servers commonly do. Compression fields sit beside the OpenAI ones so that the official
client can send them with ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
    field_validator,
)

from kvcompress.compress import compression_fields
from kvcompress.engine import MAX_LOGPROBS, SamplingParams
from kvcompress.errors import InvalidParameterError

# Integers go on into torch (tensors, generators) as 64-bit values; a larger one would fail
# deep in the engine with an overflow that names no field, so the range is checked here.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The most choices (n, best_of) one request may ask for.
MAX_CHOICES = 16
Int = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
Float = Annotated[StrictFloat, Field(allow_inf_nan=False)]
PositiveInt = Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]
# What torch.Generator.manual_seed accepts: any signed or unsigned 64-bit value.
Seed = Annotated[StrictInt, Field(ge=INT64_MIN, le=2**64 - 1)]

_STRICT: dict[type, Any] = {str: StrictStr, int: Int, float: Float, bool: StrictBool}

# KV-Compress: per-request compression fields, one per CompressionParams field. A field left
# out takes the server's default; an explicit null clears a nullable default (for example
# "compression_interval": null turns off the server's periodic compression).
CompressionFields = create_model(
    "CompressionFields",
    __config__=ConfigDict(extra="ignore"),
    **{
        spec.name: (_STRICT[spec.type] | None, Field(None, description=spec.help))
        for spec in compression_fields()
    },
)
COMPRESSION_FIELDS = tuple(spec.name for spec in compression_fields())


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with the given HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CommonRequest(CompressionFields):  # type: ignore[misc, valid-type]
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    n: PositiveInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Seed | None = None
    user: StrictStr | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[StrictStr, Float] | None = None
    # Beyond OpenAI, as vLLM-style servers accept them.
    top_k: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[Int] | None = None

    def compression_overrides(self) -> dict[str, Any]:
        """The compression fields the request gave (null included: it clears a default)."""
        return {k: getattr(self, k) for k in COMPRESSION_FIELDS if k in self.model_fields_set}

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_params(self) -> dict[str, int | None]:
        """The engine's ``logprobs`` and ``prompt_logprobs`` for this request."""
        return {}

    def best_of_param(self) -> int | None:
        return None

    def check_supported(self) -> None:
        """Reject OpenAI features this server does not implement, rather than ignore them."""
        if self.n > MAX_CHOICES:
            raise APIError(f"n must be at most {MAX_CHOICES}, got {self.n}", param="n")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(f"{param} is not supported (use 0)", param=param)
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        asked = self.requested_max_tokens()
        try:
            return SamplingParams(
                max_tokens=asked if asked is not None else default_max_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                seed=self.seed,
                stop=tuple(stop),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                n=self.n,
                best_of=self.best_of_param(),
                **self.logprob_params(),
            )
        except InvalidParameterError as err:
            raise APIError(str(err), param=err.param, code=err.code) from err

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonRequest):
    # A list of one token-id list is what batching clients (lm-evaluation-harness) send.
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    # 0 scores the prompt only (with echo and logprobs): no token is generated.
    max_tokens: NonNegativeInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: Int | None = None
    logprobs: TopLogprobs | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # One clear message instead of one error per member of the union.
        def token_ids(v: Any) -> bool:
            return isinstance(v, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in v
            )

        ok = isinstance(value, str) or (
            isinstance(value, list)
            and (
                token_ids(value)
                or all(isinstance(v, str) for v in value)
                or all(token_ids(v) for v in value)
            )
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a list of token ids, or a list of strings or of "
                "token-id lists"
            )
        return value

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError("the prompt is empty", param="prompt")
        return prompt  # type: ignore[return-value]

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_CHOICES:
                raise APIError(
                    f"best_of must be in [n, {MAX_CHOICES}], got {self.best_of}", param="best_of"
                )
            if self.stream and self.best_of > self.n:
                raise APIError("best_of > n cannot be streamed", param="best_of")
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise APIError(
                "max_tokens=0 only scores the prompt: it needs echo=true and logprobs",
                param="max_tokens",
            )

    def best_of_param(self) -> int | None:
        return self.best_of

    def logprob_params(self) -> dict[str, int | None]:
        # With echo, the prompt's tokens are listed before the completion's: with logprobs.
        prompt = self.logprobs if self.echo else None
        return {"logprobs": self.logprobs, "prompt_logprobs": prompt}


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value
        ):
            return value
        raise ValueError(
            'content must be a string or a list of {"type": "text", "text": ...} parts '
            "(only text is supported)"
        )

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # The chat templates of small models know "system" but not OpenAI's newer "developer".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(CommonRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Any] | None = None

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens or self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tools:
            raise APIError("tools are not supported", param="tools")
        if all(not m.as_template_message()["content"].strip() for m in self.messages):
            raise APIError("the messages are all empty", param="messages")

    def logprob_params(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One OpenAI-style error from pydantic/FastAPI validation errors."""
    by_field: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for err in errors:
        kind = err.get("type", "")
        loc = [x for x in err.get("loc", ()) if not _is_union_tag(x)]
        if loc and loc[0] == "body":
            loc = loc[1:]
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
            at = f" at position {loc[0]}" if loc else ""
            return APIError(f"the request body is not valid JSON: {detail}{at}")
        if not loc and kind == "missing":
            return APIError("the request body is missing; send a JSON object")
        where = ".".join(str(x) for x in loc)
        msg = "field required" if kind == "missing" else str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        if kind.endswith("_type") and "input" in err:
            got[where] = f", got {type(err['input']).__name__} {_short(err['input'])}"
        if msg not in by_field.setdefault(where, []):
            by_field[where].append(msg)
    parts = []
    for where, msgs in by_field.items():
        # A union reports each member that failed: "a valid string", "a valid list".
        text = msgs[0] + "".join(f" or {m.removeprefix('Input should be ')}" for m in msgs[1:])
        prefix = f"{where}: " if where else "the request body is invalid: "
        parts.append(prefix + text + got.get(where, ""))
    param = next((w for w in by_field if w), None)
    return APIError("; ".join(parts) or "invalid request", param=param)


def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union that failed ('str', 'list[int]', 'TextPart');
    # those are types, not request fields.
    if not isinstance(part, str):
        return False
    return part in {"str", "int", "float", "bool", "dict", "list"} or (
        "[" in part or "-" in part or part[:1].isupper()
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
