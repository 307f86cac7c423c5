"""Text generation with a qbackend-compiled Hugging Face causal LM (``model.generate``).

:func:`compile_for_generation` compiles the model's ``forward`` with ``backend="qbackend"`` and sets
the generation defaults that keep the number of compiles fixed: a static KV cache of a fixed length
and a prompt length that is dynamic from the first prompt on (one prefill graph, one decode graph).
"""

from .compile import compile_for_generation, uncompile_generation

__all__ = ["compile_for_generation", "uncompile_generation"]
