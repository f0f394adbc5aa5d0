"""Progress bars of our own that save well in notebooks, and the libraries' bars kept quiet.

`tqdm` is `tqdm.auto.tqdm`, except that in a notebook the bar is shown again when it closes: a saved
notebook read without its widget state (GitHub, nbviewer, a diff) then shows the final bar, not the first
frame stuck at 0%.

>>> sum(1 for _ in tqdm(range(3), desc="demo", disable=True))
3
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.notebook import tqdm as _notebook_tqdm


class _NotebookBar(_auto_tqdm):
    """tqdm's notebook widget, displayed under a display id and displayed again (final text) when it closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from IPython.display import display

        super().__init__(*args, **{**kwargs, "display": False})
        self._handle = None if self.disable else display(self.container, display_id=True)
        self.displayed = True

    def close(self) -> None:
        super().close()
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None and self.leave:
            handle.update(self.container)


tqdm = _NotebookBar if issubclass(_auto_tqdm, _notebook_tqdm) else _auto_tqdm


@contextmanager
def weight_cache_progress() -> Iterator[None]:
    """One bar of ours while the chat model's weight cache is built, and none of the libraries' bars.

    transformers draws "Converting and de-quantizing GGUF tensors" (`tqdm.auto`, which its switch does not
    reach), "Loading weights" and "Writing model shards"; here its GGUF loop advances our bar instead and the
    other two are switched off. The bar's last step is saving the float weights.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging

    with tqdm(desc="Preparing the chat model (once)", unit="tensor") as bar:

        def counted(tensors: Iterable, **_: Any) -> Iterator:
            tensors = list(tensors)
            bar.reset(total=len(tensors) + 1)
            for tensor in tensors:
                yield tensor
                bar.update()
            bar.set_postfix_str("saving")

        was_enabled, original = logging.is_progress_bar_enabled(), gguf_loading.tqdm
        logging.disable_progress_bar()
        gguf_loading.tqdm = counted
        try:
            yield
        finally:
            gguf_loading.tqdm = original
            if was_enabled:
                logging.enable_progress_bar()
        bar.set_postfix_str("done")
        bar.update(bar.total - bar.n if bar.total else 0)
