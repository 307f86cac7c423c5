"""Saving and loading quantized models: ``qbackend.save`` / ``qbackend.load``.

A checkpoint is one ``.safetensors`` file: per quantized layer its format record (scheme, shape and
the quantized codes and constants; never a float copy of a quantized weight, never a kernel op
name), every other tensor of the model, and a JSON manifest in the header (:mod:`.manifest`).
Loading never re-quantizes. Format-1 checkpoints (:mod:`.legacy`) and bitsandbytes 4-bit (QLoRA)
checkpoints load too.
"""

from .load import LoadResult, load, load_config
from .manifest import FORMAT_VERSION, CheckpointError
from .save import save

__all__ = ["FORMAT_VERSION", "CheckpointError", "LoadResult", "load", "load_config", "save"]
