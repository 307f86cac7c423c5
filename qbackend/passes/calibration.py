"""`calibrate(model, batches)`: per-input-channel activation absmax of every linear layer.

How: the model runs under ``torch.compile`` with a *recording* backend. Dynamo hands it the same
FX graph it hands ``qbackend`` (same tracer, same graph breaks, same parameter placeholders); the
recording backend finds the linear layers with the same matcher the W8A8 lowering uses
(:func:`qbackend.passes.find_linears`) and inserts an observer on each one's input,
then runs that graph eagerly. So the statistics are keyed by exactly the layer names the backend
later looks up. (Forward hooks on ``nn.Linear`` would miss ``F.linear``/``x @ w.t()``/Conv1D layers
the backend does lower.)

Memory is O(channels) per layer (a running max and a running sum of |x|), plus an optional bounded
uniform sample of input rows per layer for the alpha search (``sample_tokens * in_features * 4``
bytes per layer) and, with ``hessian=True``, the running ``X^T X`` of each distinct layer input
(``in_features^2 * 4`` bytes, shared by the layers reading one input, e.g. q/k/v): what GPTQ needs
(:mod:`qbackend.formats.gptq`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from .calibration_result import CalibrationError, CalibrationResult, LayerStats, default_meta
from .find_linears import find_linears


class _Recorder:
    """Running statistics of the calibration in progress."""

    def __init__(self, sample_tokens: int, seed: int, hessian: bool = False, max_hessian_bytes: int = 0) -> None:
        self.sample_tokens = sample_tokens
        self.hessian = hessian
        self.max_hessian_bytes = max_hessian_bytes
        self.hessian_bytes = 0
        self.estimate = 0  # bytes the whole model's X^T X would take (set by calibrate)
        self.only: frozenset[str] | None = None  # layers to record X^T X for (None: all)
        self.xtx: dict[str, torch.Tensor] = {}  # one tensor per distinct input, shared by its layers
        self.abssum: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.batch = -1

    def record(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.shape[0] == 0:
            return
        amax = rows.abs().amax(dim=0).cpu()
        if not bool(torch.isfinite(amax).all()):
            raise CalibrationError(
                f"the input of layer {names[0]!r} has NaN/Inf values in batch {self.batch}; "
                "check the batch (and the model in fp32) before calibrating"
            )
        for name in names:
            prev = self.absmax.get(name)
            if prev is not None and prev.numel() != amax.numel():
                raise CalibrationError(
                    f"layer {name!r} saw inputs of width {prev.numel()} and then {amax.numel()} (batch {self.batch})"
                )
            self.absmax[name] = amax if prev is None else torch.maximum(prev, amax)
            self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
        asum = rows.abs().sum(dim=0, dtype=torch.float64).cpu()
        for name in names:
            prev = self.abssum.get(name)
            self.abssum[name] = asum if prev is None else prev + asum
        if self.hessian:
            wanted = tuple(n for n in names if self.only is None or n in self.only)
            if wanted:
                self._accumulate_xtx(wanted, rows)
        if self.sample_tokens > 0:
            self._sample(names, rows.cpu())

    def _accumulate_xtx(self, names: tuple[str, ...], rows: torch.Tensor) -> None:
        xtx = self.xtx.get(names[0])
        if xtx is None:
            k = rows.shape[1]
            need = k * k * 4
            if self.hessian_bytes + need > self.max_hessian_bytes:
                raise CalibrationError(
                    f"recording X^T X of layer {names[0]!r} needs {_mib(need)} ({k}x{k} fp32) on top of "
                    f"{_mib(self.hessian_bytes)} already held; the model needs about {_mib(self.estimate)} in all, "
                    f"over max_hessian_bytes={_mib(self.max_hessian_bytes)}. Raise max_hessian_bytes if memory allows, "
                    "or calibrate fewer layers at a time (hessian_layers=[...])"
                )
            self.hessian_bytes += need
            xtx = torch.zeros(k, k, dtype=torch.float32, device=rows.device)
            for name in names:
                self.xtx[name] = xtx
        xtx.addmm_(rows.t(), rows)  # streamed: one batch of rows at a time

    def _sample(self, names: tuple[str, ...], rows: torch.Tensor) -> None:
        # Bottom-k of i.i.d. uniform keys = a uniform sample without replacement, in bounded memory.
        keys = torch.rand(rows.shape[0], generator=self.gen)
        for name in names:
            if name in self.samples:
                all_keys = torch.cat([self.keys[name], keys])
                all_rows = torch.cat([self.samples[name], rows])
            else:
                all_keys, all_rows = keys, rows
            if all_keys.numel() > self.sample_tokens:
                idx = torch.topk(all_keys, self.sample_tokens, largest=False).indices
                all_keys, all_rows = all_keys[idx], all_rows[idx]
            self.keys[name], self.samples[name] = all_keys, all_rows.clone()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


_ACTIVE: _Recorder | None = None


class _Observer(torch.nn.Module):
    """Records its input for the active calibration (a no-op outside :func:`calibrate`)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def forward(self, x: torch.Tensor) -> None:
        if _ACTIVE is not None:
            _ACTIVE.record(self.names, x)


def _recording_backend(gm: fx.GraphModule, example_inputs: list[Any]):
    """Dynamo backend: observe the input of every linear layer, then run the graph eagerly.

    One module-level function (a stable backend identity), so Dynamo's cache entry is reused by
    later calibrations of the same model class instead of piling up recompiles; observers look the
    active recorder up at call time.
    """
    by_input: dict[fx.Node, list[str]] = {}
    for site in find_linears(gm):
        by_input.setdefault(site.x, []).append(site.layer_name)
    for i, (x, names) in enumerate(by_input.items()):
        attr = f"_qbackend_observer_{i}"
        gm.add_submodule(attr, _Observer(tuple(dict.fromkeys(names))))
        with gm.graph.inserting_after(x):
            gm.graph.call_module(attr, (x,))
    gm.recompile()
    return gm.forward


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _describe(batch: Any) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"tensor{tuple(v.shape)}/{str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__

    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(one(v) for v in batch) + ")"
    return one(batch)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that are linear layers (nn.Linear and HF's Conv1D)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            out.append(name)
    return out


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    sample_tokens: int = 512,
    seed: int = 0,
    progress: bool = True,
    hessian: bool = False,
    max_hessian_bytes: int = 4 * 2**30,
    hessian_layers: Iterable[str] | None = None,
) -> CalibrationResult:
    """Run ``model`` on ``batches`` and record the per-input-channel absmax and mean |x| of every linear layer.

    batches: each is passed as ``model(**batch)`` (a dict, e.g. a tokenizer's output),
        ``model(*batch)`` (a tuple/list) or ``model(batch)``.
    sample_tokens: keep a uniform sample of up to this many input rows per layer (for
        ``search_alpha``); 0 keeps none (absmax only).
    progress: show a progress bar (tqdm).
    hessian: also record each layer's mean ``X^T X`` (fp32 ``[in, in]``; for ``method="gptq"`` and ``"awq"``),
        accumulated batch by batch. Layers reading one input share one matrix.
    max_hessian_bytes: refuse (CalibrationError with the estimated size) to hold more than this
        in ``X^T X`` matrices; default 4 GiB.
    hessian_layers: record ``X^T X`` only for these layer names (default: all).

    Raises :class:`CalibrationError` for no batches, a batch the model rejects (naming the batch and
    its shapes), NaN/Inf activations, or no linear layer reached. Linear modules no batch reached
    are listed in ``result.never_reached`` (with a warning); the backend leaves them unsmoothed.
    """
    global _ACTIVE
    from tqdm.auto import tqdm  # the progress bar library only when calibrating

    if not isinstance(sample_tokens, int) or sample_tokens < 0:
        raise CalibrationError(f"sample_tokens must be an int >= 0; got {sample_tokens!r}")
    if isinstance(batches, torch.Tensor):
        raise CalibrationError(
            "calibrate() takes an iterable of batches; got a single tensor (wrap it: calibrate(model, [x]))"
        )
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if total == 0:
        raise CalibrationError("calibrate() got zero batches: pass at least one batch of real inputs")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # already compiled: calibrate the original
        model = model._orig_mod
    if model.training:
        warnings.warn("calibrate(): the model is in training mode (dropout is active); call model.eval() first",
                      stacklevel=2)  # fmt: skip
    if not isinstance(max_hessian_bytes, int) or max_hessian_bytes < 0:
        raise CalibrationError(f"max_hessian_bytes must be an int >= 0; got {max_hessian_bytes!r}")
    recorder = _Recorder(sample_tokens, seed, hessian, max_hessian_bytes)
    recorder.only = None if hessian_layers is None else frozenset([hessian_layers] if isinstance(hessian_layers, str)
                                                                  else hessian_layers)  # fmt: skip
    recorder.estimate = _hessian_estimate(model, recorder.only) if hessian else 0
    example: Any = None
    # dynamic=True: one trace serves every batch shape (calibration batches rarely share a length).
    compiled = torch.compile(model, backend=_recording_backend, dynamic=True)
    n = 0
    _ACTIVE = recorder
    try:
        with torch.no_grad():
            bar = tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress)
            for i, batch in enumerate(bar):
                recorder.batch = i
                try:
                    _call(compiled, batch)
                except CalibrationError:
                    raise
                except Exception as e:  # the model rejected the batch: say which one and what it looked like
                    msg = str(e).strip().splitlines()
                    raise CalibrationError(
                        f"calibration batch {i} ({_describe(batch)}) failed in the model: {type(e).__name__}: "
                        f"{msg[0] if msg else ''}. Batches must be what the model accepts (dict -> model(**b), "
                        "tuple -> model(*b), else model(b)), shaped like the inputs you will compile for."
                    ) from e
                if n == 0:  # kept for the W8A8 module form, which traces the model once on it
                    example = _detached(batch)
                n += 1
    finally:
        _ACTIVE = None
    if n == 0:
        raise CalibrationError("calibrate() got zero batches: pass at least one batch of real inputs")
    if not recorder.absmax:
        raise CalibrationError(
            "calibration reached no linear layer: the model ran, but no linear with a parameter weight was traced "
            "(if it has some, Dynamo may have stopped compiling this model: recompile limit; torch._dynamo.reset())"
        )
    means: dict[int, torch.Tensor] = {}
    layers = {
        name: LayerStats(recorder.absmax[name], recorder.tokens[name], recorder.samples.get(name),
                         (recorder.abssum[name] / recorder.tokens[name]).float(), _mean_xtx(recorder, name, means))
        for name in recorder.absmax
    }  # fmt: skip
    never = tuple(m for m in linear_module_names(model) if m not in layers)
    if never:
        warnings.warn(f"calibrate(): no batch reached linear layer(s) {list(never)}; they have no statistics "
                      "(SmoothQuant leaves them unsmoothed; GPTQ and AWQ refuse them unless fallback='rtn')",
                      stacklevel=2)  # fmt: skip
    return CalibrationResult(layers, n, never, sample_tokens, default_meta(), example)


def _mean_xtx(recorder: _Recorder, name: str, done: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The layer's X^T X divided by its token count, on the CPU (layers sharing one matrix share the result)."""
    xtx = recorder.xtx.get(name)
    if xtx is None:
        return None
    mean = done.get(id(xtx))
    if mean is None:
        mean = done[id(xtx)] = (xtx / recorder.tokens[name]).cpu()
    return mean


def _hessian_estimate(model: torch.nn.Module, only: frozenset[str] | None) -> int:
    """Upper bound of the bytes of every fp32 X^T X: one per linear module (shared inputs counted per layer)."""
    total = 0
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D") and (only is None or name in only):
            k = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.weight.shape[1]
            total += k * k * 4
    return total


def _detached(batch: Any) -> Any:
    """A copy of a batch whose tensors no longer alias the caller's (one level: tensor, tuple, dict)."""

    def one(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    if isinstance(batch, Mapping):
        return {k: one(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(one(v) for v in batch)
    return one(batch)
