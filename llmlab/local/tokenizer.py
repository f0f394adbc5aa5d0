"""The chat model's tokenizer for serving, read from its `tokenizer.json` by the `tokenizers` library alone.

>>> tokens = ChatTokenizer(build_weight_cache(home))  # doctest: +SKIP
>>> tokens.encode("<|im_start|>user\\nHi"), tokens.eos_token  # doctest: +SKIP
([1, 4093, 198, 17830], '<|im_end|>')

transformers' tokenizer of the same files gives the same ids and texts (`tests/test_tokenizer.py` checks it) but
importing transformers takes seconds, most of a cold start on the ONNX engine, which needs nothing else from it.
The chat template is ours (`chat_format`); training, which needs transformers anyway, uses its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ChatTokenizer:
    """Encode, decode and the special tokens of the tokenizer in `folder` (its tokenizer.json and config).

    The method names are transformers' own, for the calls the runtime makes; no BOS is ever added (the
    model's post-processor adds none).
    """

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        eos = config["eos_token"]
        self.eos_token: str = eos["content"] if isinstance(eos, dict) else eos
        self.eos_token_id: int = self._backend.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; chat markers such as `<|im_start|>` are single tokens."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self._backend.token_to_id(token) for token in tokens]

    def convert_ids_to_tokens(self, token: int) -> str:
        return self._backend.id_to_token(token)

    def llguidance(self) -> Any:
        """The tokenizer as llguidance's constrained decoding sees it (token bytes; ~1 s, so keep it)."""
        import llguidance

        return llguidance.LLTokenizer(self._backend.to_str(), eos_token=self.eos_token_id)
