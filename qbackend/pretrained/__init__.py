"""Hugging Face model directories in and out: ``qbackend.from_pretrained`` / ``qbackend.save_pretrained``.

>>> model = qbackend.from_pretrained("path/to/llama", "nf4")   # quantized while the shards are read
>>> qbackend.save_pretrained(model, "llama-nf4", tokenizer="path/to/llama")
>>> model = qbackend.from_pretrained("llama-nf4")               # no re-quantizing, no float weights

:mod:`.directory` reads a directory's headers, :mod:`.skeleton` builds the model on the meta device,
:mod:`.stream` reads tensors one at a time into it, :mod:`.load` plans what each tensor becomes,
:mod:`.save` / :mod:`.directory_swap` write a directory atomically, :mod:`.bnb_layout` writes
transformers' bitsandbytes 4-bit layout.
"""

from .load import from_pretrained
from .save import save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
