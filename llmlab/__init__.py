"""llmlab: learn fine-tuning, embeddings + RAG and function calling with the real `openai` SDK, offline.

>>> import llmlab
>>> lab = llmlab.connect()  # OpenAI with OPENAI_API_KEY, else the local backend  # doctest: +SKIP
>>> lab.client.chat.completions.create(model=lab.chat_model, messages=[...])  # doctest: +SKIP
"""

from llmlab.connect import Lab, connect
from llmlab.doctor import doctor

__all__ = ["Lab", "connect", "doctor"]
__version__ = "0.1.0"
