"""The thin core: `QuantConfig`, the workflow registry, the torch.compile backend, ``quantize_`` and ``explain``.

It dispatches to the workflows through :mod:`.registry` and imports no workflow module itself.
"""
