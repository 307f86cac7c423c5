"""Compile a causal LM's ``forward`` with qbackend for ``generate()`` with a static KV cache.

Why ``forward`` and not the module: ``torch.compile(model)`` returns a wrapper whose ``generate``
is the original model's method, which calls the original (uncompiled, float) ``forward``; compiling
``model.forward`` in place is what makes ``model.generate`` run the compiled graphs (prefill and
decode alike).

Why these generation settings: a static cache has the same tensor shapes at every step (the decode
graph is compiled once; the position is a tensor, not a constant), and a fixed ``max_cache_len``
keeps them the same across calls. A prompt's length changes from call to call, so the prefill's
sequence dimension is marked dynamic on the first call (otherwise Dynamo compiles the first length
statically, then once more dynamically). transformers' own automatic compile of ``generate`` (on
CUDA with a static cache) is turned off: it would wrap the already compiled ``forward`` in a second
``torch.compile`` with its own backend.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

__all__ = ["compile_for_generation", "uncompile_generation"]

_ORIGINAL = "_qbackend_original_forward"


def compile_for_generation(
    model: nn.Module,
    options: Any = None,
    *,
    max_cache_len: int | None = 1024,
    mode: str | None = None,
    dynamic_prompt: bool = True,
) -> nn.Module:
    """Compile ``model.forward`` with ``backend="qbackend"`` (in place) and set its generation defaults.

    ``model``: a transformers causal LM (float, or already swapped by ``qbackend.quantize_``), or the
    ``torch.compile`` wrapper of one (its original model is used and returned). ``options``/``mode``:
    as ``torch.compile(..., backend="qbackend", options=..., mode=...)``. ``max_cache_len``: the static
    cache's length in tokens (prompt + new tokens; capped by the model's ``max_position_embeddings``);
    calls needing more get a larger cache and one more decode compile; None: sized per call by
    transformers. ``dynamic_prompt``: compile the prefill for any prompt length from the start.

    Afterwards ``model.generate(input_ids, max_new_tokens=...)`` runs greedy/sampled decoding on the
    compiled graphs with a static cache; :func:`uncompile_generation` undoes it. Returns ``model``.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wrapper -> the model itself
    gen_config = getattr(model, "generation_config", None)
    if gen_config is None or not hasattr(model, "generate"):
        raise TypeError(
            f"compile_for_generation: {type(model).__name__} has no generate()/generation_config; "
            "pass a transformers causal LM (e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    if max_cache_len is not None:
        if max_cache_len < 2:
            raise ValueError(f"compile_for_generation: max_cache_len={max_cache_len}; give at least 2 tokens")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_cache_len = min(max_cache_len, limit) if isinstance(limit, int) else max_cache_len
    original = getattr(model, _ORIGINAL, (model.forward, False))[0]
    compile_kwargs: dict[str, Any] = {"backend": "qbackend"}
    if options is not None:
        compile_kwargs["options"] = options
    if mode is not None:
        compile_kwargs["mode"] = mode
    compiled = torch.compile(original, **compile_kwargs)

    @functools.wraps(original)  # transformers reads forward's signature to choose the inputs it passes
    def forward(*args: Any, **kwargs: Any) -> Any:
        if dynamic_prompt:
            _mark_prompt_dynamic(kwargs)
        return compiled(*args, **kwargs)

    if getattr(model, _ORIGINAL, None) is None:  # remember the forward to restore, once
        setattr(model, _ORIGINAL, (original, "forward" in model.__dict__))
    model.forward = forward
    gen_config.cache_implementation = "static"
    gen_config.max_cache_len = max_cache_len
    gen_config.disable_compile = True
    return model


def uncompile_generation(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_for_generation`: the original ``forward`` back (generation settings stay)."""
    model = getattr(model, "_orig_mod", model)
    saved = model.__dict__.pop(_ORIGINAL, None)
    if saved is not None:
        original, was_own = saved
        if was_own:
            model.forward = original
        else:
            del model.forward  # the instance attribute; the class's forward shows through again
    return model


def _mark_prompt_dynamic(kwargs: dict[str, Any]) -> None:
    """A prefill call (more than one new token): its sequence dimension is dynamic in every tensor input
    of that length (ids or embeddings, positions, mask), so a new prompt length is no recompile."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] < 2:
        return
    length = tokens.shape[1]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if size == length:
                    torch._dynamo.maybe_mark_dynamic(value, dim)
