"""qbackend: a quantization compiler delivered as a torch.compile backend."""
__version__ = "0.1.0"
