"""Saving and loading quantized models: ``qbackend.save`` / ``qbackend.load``.

A checkpoint is one ``.safetensors`` file: the quantized codes and constants (never a float copy of
a quantized weight), every other tensor of the model, and a JSON manifest in the header
(:mod:`.manifest`). Loading never re-quantizes. bitsandbytes 4-bit (QLoRA) checkpoints load too.
"""

from .load import load
from .manifest import FORMAT_VERSION, CheckpointError
from .save import save

__all__ = ["FORMAT_VERSION", "CheckpointError", "load", "save"]
