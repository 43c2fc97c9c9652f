"""The OpenAI request bodies ``nanollada serve`` accepts, validated strictly, and OpenAI's error shape.

Validation is strict (pydantic strict mode, unknown fields refused): ``"temperature": "0.5"`` or ``"stream": 1`` is
a 400, not silently coerced, and a misspelt field is named in the error. OpenAI fields the server does not implement
are accepted only at their neutral values (``n: 1``, ``logprobs: false``, ``presence_penalty: 0``, ...).

nanollada's own decoding knobs travel under one extra key, ``"nanollada": {...}`` (the openai client sends it with
``extra_body={"nanollada": {...}}``): any ``GenerationSettings`` field except ``max_new_tokens`` (use
``max_tokens``) and ``chat`` (the endpoint decides), e.g. ``strategy``, ``block_length``, ``threshold``, ``steps``,
``commit_top_k``, ``budget``, ``use_prefix_cache``, ``top_k``, ``repetition_penalty``, ``greedy``, ``cfg_scale``,
``editing`` (block diffusion: ``speedy`` / ``quality`` / ``custom``; the answer's ``nanollada`` stats then carry
``edits``, ``tau_mask`` and ``tau_edit``); plus ``"canvas": true`` (streaming only) for the denoising frames the web
page animates (each change ``[position, text, "fill" | "edit" | "remask"]``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: F401  (re-exported)

from nanollada.generate import GenerationSettings

EXCLUDED_SETTINGS = ("max_new_tokens", "chat")
NANOLLADA_KEYS = tuple(f for f in GenerationSettings.__dataclass_fields__ if f not in EXCLUDED_SETTINGS) + ("canvas",)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class Sampling(Strict):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logit_bias: None = None
    nanollada: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    response_format: dict[str, Literal["text"]] | None = None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None


UNSUPPORTED_HINTS = {
    "n": "only n=1 is supported",
    "presence_penalty": "not supported; nanollada.repetition_penalty penalises repeats",
    "frequency_penalty": "not supported; nanollada.repetition_penalty penalises repeats",
    "logprobs": "not supported", "top_logprobs": "not supported", "echo": "not supported",
    "suffix": "not supported", "best_of": "only best_of=1 is supported",
    "response_format": "only {\"type\": \"text\"} is supported", "logit_bias": "not supported",
}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error as an OpenAI 400 naming the parameter."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in ("str", "list")))]
    param = ".".join(loc) or None
    top = loc[0] if loc else ""
    if err["type"] == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif err["type"] == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif top in UNSUPPORTED_HINTS and err["type"] in ("literal_error", "none_required"):
        msg = f"{param}: {UNSUPPORTED_HINTS[top]} (got {err.get('input')!r})"
    else:
        msg = f"Invalid value for '{param}': {err['msg']} (got {err.get('input')!r})"
    return APIError(400, msg, param=param, code="invalid_value" if err["type"] != "missing" else "missing")


def parse(model: type[Strict], body: Any) -> Strict:
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
