"""The serving tokenizer (`ChatTokenizer`: tokenizer.json through `tokenizers` alone) is transformers' own: a
server on the ONNX engine answers chats without importing transformers (tests/test_cold_start.py).

Both tokenizers read the chat model's weight cache (built by the session, see conftest). The ids of varied
texts, the texts of ids (with and without special tokens), the special tokens, and the token bytes llguidance
sees (constrained decoding) must be the same, or an answer on the ONNX engine would differ from training's.
"""

from __future__ import annotations

import pytest
from conftest import TEST_HOME

from llmlab.local import chat_format
from llmlab.local.tokenizer import ChatTokenizer
from llmlab.local.weights import build_weight_cache

TEXTS = [
    "",
    "Hello, world!",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_end|><|endoftext|> <repo_name>x",
    "   leading spaces, trailing   \n\n\n\t\ttabs and \r\n lines   ",
    "naïve café — “quotes” ‘single’ … € £ ¥ 東京 Ελληνικά русский עברית العربية हिन्दी 🙂👍🏽 👩‍👩‍👧",
    '{"name": "get_leave", "arguments": {"employee": "Yusuf Demir", "days": 27}}',
    "def f(x):\n    return x ** 2  # comment\n",
    "\u200b zero width, \u00a0 no-break, combining e\u0301",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|",  # half a marker is text
]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer

    folder = build_weight_cache(TEST_HOME)
    return ChatTokenizer(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    ours, theirs = pair
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_tokens_match_transformers(pair):
    ours, theirs = pair
    assert (ours.eos_token, ours.eos_token_id) == (theirs.eos_token, theirs.eos_token_id)
    assert ours.eos_token == chat_format.END
    markers = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    assert ours.convert_tokens_to_ids(markers) == theirs.convert_tokens_to_ids(markers)
    assert [ours.convert_ids_to_tokens(i) for i in range(0, 49152, 97)] == theirs.convert_ids_to_tokens(
        list(range(0, 49152, 97))
    )
    assert ours.decode(ours.encode("<|im_start|>user\nHi<|im_end|>"), skip_special_tokens=True) == "user\nHi"


def test_llguidance_sees_the_same_tokens(pair):
    import llguidance.hf

    ours, theirs = pair
    mine, reference = ours.llguidance(), llguidance.hf.from_tokenizer(theirs)
    assert (mine.vocab_size, mine.eos_token) == (reference.vocab_size, reference.eos_token)
    for token in range(mine.vocab_size):
        assert mine.is_special_token(token) == reference.is_special_token(token)
        assert mine.decode_bytes([token]) == reference.decode_bytes([token])
