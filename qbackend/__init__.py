"""qbackend: a quantization compiler delivered as a torch.compile backend.

>>> model = torch.compile(model, backend="qbackend", options={"preset": "int8"})
>>> print(qbackend.explain(model_eager, example_input))
>>> qbackend.quantize_(model, "nf4")   # free the float weights of the linear layers
"""

__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .explain import explain  # noqa: E402
from .quantize_module import QuantizedLinear, quantize_  # noqa: E402
from .report import LayerReport, Report  # noqa: E402

__all__ = ["LayerReport", "QuantConfig", "QuantizedLinear", "Report", "__version__", "explain", "quantize_"]
