"""Token counts against the values OpenAI's Cookbook published (its chat counts were checked against the API)."""

import pytest

from llmlab import tokens

# "How to count tokens with tiktoken" (openai-cookbook): token ids printed by tiktoken.
KNOWN_IDS = {
    ("cl100k_base", "tiktoken is great!"): [83, 1609, 5963, 374, 2294, 0],
    ("o200k_base", "tiktoken is great!"): [83, 8251, 2488, 382, 2212, 0],
    ("cl100k_base", "antidisestablishmentarianism"): [519, 85342, 34500, 479, 8997, 2191],
    ("cl100k_base", "2 + 2 = 4"): [17, 489, 220, 17, 284, 220, 19],
    ("cl100k_base", "お誕生日おめでとう"): [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
    ("o200k_base", "お誕生日おめでとう"): [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669],
}

# The Cookbook's example conversation: the API reported 129 prompt tokens (gpt-3.5-turbo, gpt-4) and 124 (gpt-4o, gpt-4o-mini).
JARGON = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]  # fmt: skip
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(("encoding", "text"), list(KNOWN_IDS))
def test_known_token_ids(encoding, text):
    enc = tokens.encoding_for(encoding)
    assert enc.encode(text) == KNOWN_IDS[(encoding, text)]
    assert enc.decode(enc.encode(text)) == text
    assert tokens.count_tokens(text, encoding) == len(KNOWN_IDS[(encoding, text)])


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "text-embedding-3-small"])
def test_hello_world_is_two_tokens(model):
    assert tokens.count_tokens("hello world", model) == 2


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme:faq:abc123", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
    ],
)
def test_encoding_for_model(model, encoding):
    assert tokens.encoding_name_for(model) == encoding
    assert tokens.encoding_for(model).name == encoding


def test_unknown_model_lists_known_families():
    with pytest.raises(tokens.UnknownModelError, match="gpt-4o"):
        tokens.encoding_name_for("llama-3-8b")


def test_special_token_text_counts_as_plain_text():
    # tiktoken.encode raises on "<|endoftext|>"; the API treats message text as plain text.
    assert tokens.count_tokens("<|endoftext|>", "gpt-4") == len(
        tokens.encoding_for("gpt-4").encode_ordinary("<|endoftext|>")
    )
    assert tokens.count_tokens("<|endoftext|>", "gpt-4") > 1


def test_lone_surrogate_does_not_crash():
    assert tokens.count_tokens("a\ud800b") >= 2


def test_the_private_counter_of_bpe_openai_is_still_there():
    """tokens._counter counts through bpe-openai's private `_bindings` (its docstring says why): a release that
    drops or changes it fails here, with the reason, rather than somewhere deep in a dataset validation."""
    import bpe_openai

    try:
        from bpe_openai import _bindings
    except ImportError as e:
        pytest.fail(
            f"bpe-openai {bpe_openai.__version__} no longer has the private module _bindings ({e}); "
            "llmlab.tokens._counter counts tokens through it: port _counter to this release's API"
        )
    count = getattr(_bindings.tokenizer_for_encoding("o200k_base"), "count", None)
    assert callable(count), (
        f"bpe-openai {bpe_openai.__version__}: _bindings' tokenizer has no count(text) any more; "
        "llmlab.tokens._counter needs it: port _counter to this release's API"
    )
    assert count("hello world") == 2
    text = "word " * 210_000  # more than the public API accepts (1,000,000 characters, 200,000 tokens)
    assert tokens.count_tokens(text) == 210_001


def test_count_matches_encode_on_long_mixed_text():
    text = (
        "Leave policy: 25 days/year. Überstunden → 1.5×; 休暇は25日。\n\n  def f(x): return x**2  # ok\n" * 50
    )
    for name in tokens.ENCODINGS:
        assert tokens.count_tokens(text, name) == len(tokens.encoding_for(name).encode_ordinary(text))


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)]
)
def test_chat_tokens_match_cookbook_api_counts(model, expected):
    assert tokens.count_chat_tokens(JARGON, model) == expected


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_chat_tokens_with_tools_match_cookbook_api_counts(model, expected):
    assert tokens.count_chat_tokens(WEATHER_MESSAGES, model, tools=WEATHER_TOOLS) == expected


def test_tool_calls_and_weight_are_counted_without_crashing():
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": '{"location": "Paris"}'},
    }
    plain = [{"role": "user", "content": "Weather in Paris?"}]
    with_call = [*plain, {"role": "assistant", "content": None, "tool_calls": [call], "weight": 1}]
    extra = tokens.count_chat_tokens(with_call) - tokens.count_chat_tokens(plain)
    expected = (
        3 + 1 + 3 + tokens.count_tokens("get_current_weather") + tokens.count_tokens('{"location": "Paris"}')
    )
    assert extra == expected  # message overhead + "assistant" + per-call overhead + name + arguments


@pytest.mark.parametrize(
    ("n", "epochs"), [(1, 25), (3, 25), (4, 25), (5, 20), (10, 10), (33, 4), (34, 3), (100, 3), (8333, 3), (8334, 2), (10_000, 2), (25_000, 1), (100_000, 1)]
)  # fmt: skip
def test_default_epochs_boundaries(n, epochs):
    assert tokens.default_epochs(n) == epochs


def test_default_epochs_rejects_empty():
    with pytest.raises(ValueError):
        tokens.default_epochs(0)


def test_billed_tokens_caps_each_example():
    assert tokens.billed_tokens([10, 20_000], n_epochs=3) == (10 + 16_385) * 3
    assert tokens.billed_tokens([10, 20_000], n_epochs=1, max_tokens=65_536) == 20_010


def test_prices_are_dated_and_resolve_snapshots():
    assert tokens.PRICES_DATE
    assert tokens.price_for("gpt-4o-mini-2024-07-18").training == 3.00
    assert tokens.price_for("gpt-4o-2024-08-06").training == 25.00
    assert tokens.price_for("gpt-4.1-mini-2025-04-14").training == 5.00
    assert tokens.price_for("gpt-4.1-2025-04-14").training == 25.00
    assert tokens.price_for("gpt-4.1-nano").training == 1.50
    assert tokens.price_for("gpt-3.5-turbo-0125").training == 8.00
    assert (tokens.price_for("gpt-4o-mini").input, tokens.price_for("gpt-4o-mini").output) == (0.15, 0.60)
    assert tokens.price_for("text-embedding-3-small").input == 0.02


def test_fine_tuned_model_is_priced_as_fine_tuned():
    price = tokens.price_for("ft:gpt-4o-mini-2024-07-18:acme:faq:abc123")
    assert (price.input, price.output) == (0.30, 1.20)
    assert tokens.chat_cost("ft:gpt-4o-mini-2024-07-18:acme:faq:abc123", 1_000_000, 1_000_000) == 1.50


def test_costs():
    assert tokens.chat_cost("gpt-4o-mini", 1_000_000, 1_000_000) == 0.75
    assert tokens.embedding_cost("text-embedding-3-small", 500_000) == 0.01
    assert tokens.training_cost("gpt-4.1-mini-2025-04-14", 2_000_000) == 10.0
    with pytest.raises(tokens.UnknownModelError, match="embedding"):
        tokens.chat_cost("text-embedding-3-small", 10)
    with pytest.raises(tokens.UnknownModelError, match="cannot be fine-tuned"):
        tokens.training_cost("text-embedding-3-small", 10)


def test_unknown_price_lists_known_models():
    with pytest.raises(tokens.UnknownModelError, match="gpt-4o-mini-2024-07-18"):
        tokens.price_for("gpt-9")
