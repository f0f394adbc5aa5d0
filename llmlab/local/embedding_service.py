"""The embeddings service: one embeddings request, from its JSON body to OpenAI's response.

The request is checked (`requests.EmbeddingRequest`, then OpenAI's input-length limit counted in OpenAI's
own tokens) before the embedding model is asked; vectors come back as floats or base64 little-endian
float32, as OpenAI sends them. The response is built without the `openai` package (a cold start's second);
tests/test_conformance.py checks it against the SDK's `CreateEmbeddingResponse`.

>>> embeddings(Models(home), {"model": "text-embedding-3-small", "input": "Hi"})["usage"]  # doctest: +SKIP
{'prompt_tokens': 3, 'total_tokens': 3}
"""

from __future__ import annotations

import base64

from llmlab import openai_facts
from llmlab.local.errors import APIError, model_not_found
from llmlab.local.requests import EmbeddingRequest, parse
from llmlab.local.runtimes import Models
from llmlab.models import CHAT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_alias

EMBEDDING_INPUT_LIMIT = 8191  # OpenAI's limit per embeddings input, in its own tokens (cl100k_base)


def embeddings(models: Models, body: dict) -> dict:
    """OpenAI's `CreateEmbeddingResponse` (as a dict) for the embeddings request `body`."""
    request = parse(EmbeddingRequest, body)
    model = request.model
    local = resolve_alias(model)
    if local == CHAT_MODEL_ID or model.startswith("ft:"):
        raise APIError(
            400, f"{model} is a chat model: use an embedding model such as {EMBEDDING_MODEL_ID}.", "model"
        )
    if local != EMBEDDING_MODEL_ID:
        raise model_not_found(model)
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not all(isinstance(t, str) for t in texts):
        raise APIError(
            400, "'input' must be text: token-id arrays are not supported by the local server.", "input"
        )
    if request.dimensions is not None:
        raise APIError(
            400,
            f"{EMBEDDING_MODEL_ID} has a fixed size of 384 dimensions: 'dimensions' is not supported.",
            "dimensions",
        )
    encoding = request.encoding_format or "float"
    _check_input_lengths(texts)
    runtime = models.embedding()
    vectors = runtime.embed(texts)
    tokens = runtime.count_tokens(texts)
    data = []
    for i, vector in enumerate(vectors):
        as_float32 = vector.astype("<f4")
        embedding = (
            base64.b64encode(as_float32.tobytes()).decode("ascii")
            if encoding == "base64"
            else as_float32.tolist()
        )
        data.append({"embedding": embedding, "index": i, "object": "embedding"})
    return {
        "data": data,
        "model": EMBEDDING_MODEL_ID,
        "object": "list",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _check_input_lengths(texts: list[str]) -> None:
    """Refuse an input longer than OpenAI's limit, counted in OpenAI's tokens (a text of at most that many
    UTF-8 bytes cannot exceed it, so only longer ones are counted)."""
    from llmlab.tokens import count_tokens

    for i, text in enumerate(texts):
        if len(text.encode("utf-8")) > EMBEDDING_INPUT_LIMIT:
            tokens = count_tokens(text, openai_facts.EMBEDDING_MODEL)
            param = f"input[{i}]" if len(texts) > 1 else "input"
            if tokens > EMBEDDING_INPUT_LIMIT:
                raise APIError(
                    400,
                    f"'{param}' is {tokens} tokens long; the maximum input length is {EMBEDDING_INPUT_LIMIT} "
                    "tokens. Please reduce the length of the input.",
                    param,
                )
