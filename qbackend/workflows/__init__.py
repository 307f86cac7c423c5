"""The workflows: one package each, owning its config, graph passes, module form, results and guards.

* :mod:`.weight_only`: nf4/fp4/int4/int8 weights, float activations.
* :mod:`.w8a8`: SmoothQuant W8A8 (calibration, scale folding, int8 x int8 lowering); uses weight_only.
* :mod:`.qat`: quantization-aware training and LoRA/QLoRA; uses weight_only.

Each package defines ``WORKFLOW`` (a :class:`qbackend.core.registry.Workflow`), which the core's
registry loads by module name. Workflows do not import the core nor each other (except as declared).
"""
