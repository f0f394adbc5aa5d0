"""The offline backend: an OpenAI-compatible server over real small models (see `llmlab.local.server`)."""

import warnings

# peft reads transformers' deprecated `is_gradient_checkpointing` each time it wraps a model (training a
# LoRA, loading an adapter): a warning the learner can do nothing about, printed into notebook outputs.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
