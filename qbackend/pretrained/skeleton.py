"""The model of a config.json with its parameters on the meta device (no float weight allocated).

Buffers are built for real: the non-persistent ones (rotary ``inv_freq``) are computed by the model's
constructor and are not in the checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import CheckpointError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers goes to the meta device (buffers do not)."""
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        # a parameter already on meta is registered as is: tying (lm_head.weight = embed.weight) keeps identity
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def stored_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype config.json says the weights are stored in (``dtype`` / ``torch_dtype``), if any."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def build_skeleton(model_class: Any, config: dict[str, Any], path: Path) -> nn.Module:
    """``model_class.from_config`` (an Auto class or a model class) of ``config``, parameters on meta."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{path}: building the model needs transformers (pip install transformers)") from None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = transformers.AutoConfig.for_model(**cfg) if "model_type" in cfg else None
    except Exception as e:  # noqa: BLE001  (a corrupt config can fail anywhere)
        raise CheckpointError(f"{path}: cannot read the model config ({type(e).__name__}: {_first_line(e)})") from None
    if hf_config is None:
        raise CheckpointError(f"{path}: has no 'model_type'; not a transformers model config")
    dtype = stored_dtype(config)
    try:
        with parameters_on_meta(), _no_init_weights(transformers):
            if hasattr(model_class, "from_config"):
                kwargs = {"dtype": dtype} if dtype is not None else {}
                model = model_class.from_config(hf_config, **kwargs)
            else:
                model = model_class(hf_config)
    except Exception as e:  # noqa: BLE001
        name = getattr(model_class, "__name__", str(model_class))
        raise CheckpointError(f"{path}: cannot build {name} from it ({type(e).__name__}: {_first_line(e)})") from None
    if callable(getattr(model, "tie_weights", None)):
        with parameters_on_meta():
            model.tie_weights()  # skipped with the init: an output layer tied to the embedding shares its tensor
    return model.eval()


def _no_init_weights(transformers: Any) -> contextlib.AbstractContextManager:
    """transformers' context that skips the random init (every weight comes from the checkpoint)."""
    for module_name in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "no_init_weights"):
            return module.no_init_weights()
    return contextlib.nullcontext()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
