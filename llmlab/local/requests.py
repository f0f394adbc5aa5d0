"""The local server's request bodies as pydantic models (a refused one is an `errors.APIError`).

Every endpoint parses its body with `parse` before doing any work, so a field of the wrong type is a 400
naming it (`param`), never a 500 and never half-stored state. Models are strict (no "5" for 5, no 1 for
True) like OpenAI's own checks; unknown top-level arguments are refused, unknown keys inside messages are
ignored (the SDK's own message objects carry extra keys such as `annotations`).

>>> parse(EmbeddingRequest, {"model": "text-embedding-3-small", "input": "Hi"}).input
'Hi'
>>> try:
...     parse(EmbeddingRequest, {"model": "text-embedding-3-small", "input": 5})
... except APIError as error:
...     print(error.status, error.param, error.message)
400 input Invalid type for 'input': expected a valid string or a valid list.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmlab.local.errors import APIError, request_error

MAX_N = 8  # completions per chat request (OpenAI allows 128; each one is generated on a small CPU)
MAX_EMBEDDING_INPUTS = 2048  # texts per embeddings request, as OpenAI
MAX_SCHEMA_DEPTH = 64  # nesting of a JSON schema in a tool or a response format
# the SDK's `openai.types.shared.ReasoningEffort`, written out: the server starts without importing the SDK
# (tests/test_server_hardening.py checks that the two agree)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None

Request = TypeVar("Request", bound=BaseModel)


def parse(model: type[Request], body: Any) -> Request:
    """`body` as `model`, or the APIError (400, `param` set) for its first problem."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise request_error(exc.errors(include_url=False), body) from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.") from None


# -- shared pieces -------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    """Strict JSON types; unknown keys refused."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    """Strict JSON types; unknown keys ignored (objects the SDK hands back with extra keys)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _valid_schema(schema: dict) -> dict:
    """`schema` if llguidance (what constrains the output) can compile it, else a ValueError saying why."""
    import llguidance

    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"lenient": True})
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RecursionError) as exc:
        problem = str(exc)
    if problem:
        raise ValueError(f"not a valid JSON schema: {problem}")
    return schema


NonEmpty = Annotated[str, Field(min_length=1)]
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JsonSchema = Annotated[dict[str, Any], AfterValidator(_valid_schema)]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


FilePurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


# -- chat completions ----------------------------------------------------------------------------------------------
class TextPart(_Open):
    type: Literal["text"]
    text: str


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Open):
    type: Literal["file"]
    file: dict[str, Any]


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class FunctionName(_Strict):
    name: str


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Open):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    audio: dict[str, Any] | None = None


class ToolMessage(_Open):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Open):
    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Open):
    name: Name
    description: str | None = None
    parameters: JsonSchema | None = None
    strict: bool | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class NamedCustomChoice(_Strict):
    type: Literal["custom"]
    custom: FunctionName


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class AllowedToolsChoice(_Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[NamedToolChoice | NamedCustomChoice | AllowedToolsChoice, Field(discriminator="type")]
)


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: Name
    description: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`: every argument of OpenAI's (`completion_create_params`), typed."""

    messages: Annotated[list[Message], Field(min_length=1)]
    model: NonEmpty
    audio: dict[str, Any] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    metadata: Metadata | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    moderation: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    reasoning_effort: ReasoningEffort = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    tool_choice: ToolChoice | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    user: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_choice_when_streaming(self) -> ChatCompletionRequest:
        if self.stream and (self.n or 1) > 1:
            raise APIError(400, "Streaming supports n=1 only.", "n")
        return self


# -- embeddings ------------------------------------------------------------------------------------------------------
class EmbeddingRequest(_Strict):
    """`POST /v1/embeddings` (`embedding_create_params`)."""

    input: (
        NonEmpty
        | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[list[int]], Field(min_length=1)]
    )
    model: NonEmpty
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


# -- fine-tuning jobs -----------------------------------------------------------------------------------------------
class Hyperparameters(_Strict):
    """The local limits of OpenAI's hyperparameters; None and "auto" both mean "choose for me"."""

    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] | None = None
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(ge=1e-6, le=10)] | None = None
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] | None = None

    def resolved(self) -> dict[str, Any]:
        """Every hyperparameter, "auto" where none was given."""
        return {name: "auto" if value is None else value for name, value in self}


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supervised_only(self) -> Method:
        if self.type != "supervised":
            raise APIError(400, "Only method type 'supervised' is available locally.", "method.type")
        return self


class FineTuningJobRequest(_Strict):
    """`POST /v1/fine_tuning/jobs` (`job_create_params`)."""

    model: NonEmpty
    training_file: NonEmpty
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: Metadata | None = None
    method: Method | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    validation_file: NonEmpty | None = None

    def requested_hyperparameters(self) -> Hyperparameters:
        """`method.supervised.hyperparameters`, else the deprecated top-level `hyperparameters`."""
        supervised = self.method.supervised if self.method else None
        return (supervised and supervised.hyperparameters) or self.hyperparameters or Hyperparameters()
