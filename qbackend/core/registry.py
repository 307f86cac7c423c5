"""The workflow registry: which code handles a config, on the compile path and on the module path.

A `Workflow` is one way of quantizing a model (weight-only, W8A8/SmoothQuant, QAT, or a third
party's), described by its handlers. The core (``qbackend`` backend, ``quantize_``, ``explain``,
``save``/``load``) looks the workflow up here and calls its handlers; it imports no workflow code.
Built-in workflows are found by module name on first use (as entry points are); others call
`register_workflow`:

>>> register_workflow(Workflow("toy", compile=run_toy, quantize=quantize_toy, config_type=ToyConfig))
>>> torch.compile(model, backend="qbackend", options=ToyConfig(...))

A `QuantConfig` selects a built-in workflow by its workflow fields (``method`` -> "weight_only",
``smoothquant`` -> "w8a8", ``qat`` -> "qat"; none -> "weight_only"); any other config object selects
the workflow registered for its type.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

#: name -> (module defining ``WORKFLOW``, the QuantConfig fields it owns). Loaded on first use only.
#: A built-in module's ``WORKFLOW`` is a dict of `Workflow`'s fields (workflows sit below the core and
#: do not import it), as an entry point names its object. Listed with what a workflow builds on before it.
BUILTIN: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "weight_only": ("qbackend.workflows.weight_only", ("method",)),
    "w8a8": ("qbackend.workflows.w8a8", ("smoothquant", "calibration")),
    "qat": ("qbackend.workflows.qat", ("qat",)),
}
DEFAULT = "weight_only"


class WorkflowError(LookupError):
    """No workflow handles this config, or a workflow lacks the handler asked for."""


@dataclass(frozen=True)
class Workflow:
    """One workflow's handlers (all take the config object the user's options became).

    name: registry key.
    compile: the compile path: ``compile(gm, config, measure_error) -> LoweringResult``: rewrite the
        Dynamo graph in place (before Inductor); the result's ``lowered`` weights get the backend's
        per-call staleness guard.
    quantize: the module path (``qbackend.quantize_``): ``quantize(model, config, example_inputs) -> Report``,
        swapping modules in place. None: no module form.
    config_type: a config class of the workflow's own: ``options=`` of that type select it.
    normalize: validates those fields: ``normalize(config) -> {field: normalized value}``; raises
        ValueError with a message for the user.
    guard: wraps the compiled callable: ``guard(result, compiled) -> callable`` (e.g. a check that
        parameters folded into constants did not change).
    detect: ``detect(gm) -> bool``: claim a graph whose config selects no workflow (QAT: a model with
        prepared QAT state compiled with plain options).
    explain: rows for layers the module path already quantized: ``explain(model) -> list[LayerReport]``.
    modules: the module classes its module path puts in a model (for save/load/inspect to recognise
        a quantized model without importing the workflow).
    record: save: ``record(module, name) -> LayerRecord | None``: the format record
        (:class:`qbackend.formats.LayerRecord`) of a module of its own, None for any other module.
    build: load: ``build(record, name, kernel_weights) -> nn.Module | None``: the module for a record
        of one of its ``record_kinds``, None for a record it leaves to another workflow (QAT builds
        the weight-only records that carry activation settings). ``kernel_weights``: a dict the
        workflow may cache built kernel weights in for the whole load (tied layers share them).
        Raises ValueError/TypeError for a corrupt record (`RecordError` for a message shown as is).
    record_kinds: the record kinds it describes or builds: ``{kind: (option names, tensor names)}``,
        the names its records of that kind may carry in ``options`` / ``tensors``.
    """

    name: str
    compile: Callable[..., Any]
    quantize: Callable[..., Any] | None = None
    config_type: type | None = None
    normalize: Callable[[Any], dict[str, Any]] | None = None
    guard: Callable[[Any, Callable], Callable] | None = None
    detect: Callable[[Any], bool] | None = None
    explain: Callable[[Any], list] | None = None
    modules: tuple[type, ...] = ()
    record: Callable[[Any, str], Any] | None = None
    build: Callable[[Any, str, dict], Any] | None = None
    record_kinds: Mapping[str, tuple[Collection[str], Collection[str]]] = field(
        default_factory=dict, hash=False, compare=False
    )


_registry: dict[str, Workflow] = {}


def register_workflow(workflow: Workflow, *, replace: bool = False) -> Workflow:
    """Add ``workflow`` (its name must be new unless ``replace``); returns it."""
    old = _registry.get(workflow.name)
    if old is not None and old is not workflow and not replace:
        raise WorkflowError(f"a workflow named {workflow.name!r} is registered already; pass replace=True")
    _registry[workflow.name] = workflow
    return workflow


def unregister_workflow(name: str) -> None:
    """Remove a registered workflow (a built-in one comes back on next use)."""
    _registry.pop(name, None)


def get_workflow(name: str) -> Workflow:
    """The workflow ``name``, loading a built-in one on first use."""
    wf = _registry.get(name)
    if wf is not None:
        return wf
    if name not in BUILTIN:
        raise WorkflowError(f"no workflow named {name!r}; known: {', '.join(sorted({*BUILTIN, *_registry}))}")
    module = importlib.import_module(BUILTIN[name][0])  # by name: the core never imports workflow code itself
    spec = module.WORKFLOW
    wf = spec if isinstance(spec, Workflow) else Workflow(**spec)
    if wf.name != name:
        raise WorkflowError(f"{BUILTIN[name][0]}.WORKFLOW is named {wf.name!r}; the registry expects {name!r}")
    return register_workflow(wf)


def workflows() -> list[Workflow]:
    """Every workflow: the built-in ones (loaded now) and the registered ones."""
    for name in BUILTIN:
        get_workflow(name)
    return list(_registry.values())


def module_types() -> tuple[type, ...]:
    """The quantized module classes of every workflow (``isinstance(m, module_types())``: quantized already)."""
    return tuple(t for wf in workflows() for t in wf.modules)


def extension_order() -> list[Workflow]:
    """Every workflow, those that may extend another's modules or record kinds first: the registered
    ones (newest first), then the built-ins with dependents before what they build on (qat and w8a8
    before weight_only). Save/load ask ``record``/``build`` handlers in this order; the first answer wins.
    """
    workflows()
    registered = [wf for name, wf in _registry.items() if name not in BUILTIN]
    return [*reversed(registered), *(_registry[name] for name in reversed(BUILTIN) if name in _registry)]


def record_kinds() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Every record kind a workflow builds: ``{kind: (option names, tensor names)}`` over all workflows."""
    out: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for wf in workflows():
        for kind, (options, tensors) in wf.record_kinds.items():
            old_options, old_tensors = out.get(kind, (frozenset(), frozenset()))
            out[kind] = (old_options | frozenset(options), old_tensors | frozenset(tensors))
    return out


def workflow_fields() -> tuple[str, ...]:
    """The ``QuantConfig`` fields the built-in workflows own (their first field selects the workflow)."""
    return tuple(f for _module, fields in BUILTIN.values() for f in fields)


def selecting_fields() -> tuple[str, ...]:
    """The field that selects each built-in workflow that has one ("smoothquant", "qat")."""
    return tuple(fields[0] for _module, fields in BUILTIN.values() if fields)


def normalize_options(config: Any) -> dict[str, Any]:
    """Normalized values of the built-in workflow fields of a ``QuantConfig`` that are set.

    A workflow is loaded only when one of its fields is set (None/False are unset).
    """
    out: dict[str, Any] = {}
    for name, (_module, fields) in BUILTIN.items():
        if any(not (getattr(config, f, None) is None or getattr(config, f, None) is False) for f in fields):
            normalize = get_workflow(name).normalize
            if normalize is not None:
                out.update(normalize(config))
    return out


def config_workflow(config: Any) -> Workflow | None:
    """The workflow a non-``QuantConfig`` config object belongs to (by its type), or None."""
    for wf in list(_registry.values()):
        if wf.config_type is not None and isinstance(config, wf.config_type):
            return wf
    return None


def workflow_for(config: Any, gm: Any = None) -> Workflow:
    """The workflow handling ``config`` (and, on the compile path, the graph ``gm``)."""
    wf = config_workflow(config)
    if wf is not None:
        return wf
    for name, (_module, fields) in BUILTIN.items():
        if fields and getattr(config, fields[0], None) is not None:
            return get_workflow(name)
    if gm is not None:
        for wf in workflows():
            if wf.detect is not None and wf.detect(gm):
                return wf
    return get_workflow(DEFAULT)
