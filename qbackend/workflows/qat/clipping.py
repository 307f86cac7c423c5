"""Activation-aware initialisation of the learnable clipping ratios (a better start for QAT).

For every prepared layer with learnable ratios, ``calibrate_clipping`` picks, per unit (block /
group / channel), the ratio on a grid that minimises the activation-weighted error of its
fake-quantized weight, ``sum_k E[x_k^2] * (fq(W)[n, k] - W[n, k])^2`` — the output error
``E||(fq(W) - W) x||^2`` with cross-channel terms dropped — where ``E[x_k^2]`` comes from the
layer's inputs while ``run()`` feeds calibration data through the (eager, float) model. One pass per
grid value suffices: units are independent, except that nested constants couple the blocks of a
group through the second-level scale and offset (each block is chosen with the others unclipped;
a block can then end up slightly worse than unclipped, the layer's total error is still lower).

On MiniLM (NF4 b64 nested) this alone takes plain PTQ from 0.9740 to 0.9787 embedding cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .fake_quant import fake_quantize_weight
from .state import LinearQAT, state_of
from .units import to_units

DEFAULT_GRID = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8)


@torch.no_grad()
def calibrate_clipping(model: nn.Module, run: Callable[[], Any], grid: Sequence[float] = DEFAULT_GRID) -> int:
    """Set the clipping ratios of ``model``'s prepared layers from the inputs seen during ``run()``.

    ``run``: calls the (eager) model on calibration data, e.g. ``lambda: model(**batch)``.
    Returns the number of layers calibrated (layers without learnable ratios are skipped; so are
    layers ``run`` never reached, which keep their ratios).
    """
    grid = tuple(float(r) for r in grid)
    if not grid or not all(0.0 < r <= 1.0 for r in grid):
        raise ValueError(f"calibrate_clipping: grid must be a non-empty sequence of ratios in (0, 1]; got {grid}")
    moments: dict[int, torch.Tensor] = {}
    states: dict[int, tuple[LinearQAT, torch.Tensor]] = {}
    hooks = []
    for mod in model.modules():
        state = state_of(mod.weight) if isinstance(mod, nn.Linear) else None
        if state is None or state.weight_ratio is None:
            continue
        key = id(state)
        states[key] = (state, mod.weight)

        def hook(_m: nn.Module, inputs: tuple, _out: Any, key: int = key) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            moments[key] = moments.get(key, 0) + (x * x).sum(0)

        hooks.append(mod.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    if states and not moments:
        raise ValueError(
            f"calibrate_clipping: run() reached none of the {len(states)} prepared layers with learnable ratios; "
            "it must call the eager (uncompiled) model that was prepared, e.g. lambda: model(**batch)"
        )
    for key, (state, w) in states.items():
        if key in moments:
            state.weight_ratio.copy_(_best_ratios(w.detach(), state, moments[key], grid))
    return len(moments)


def _best_ratios(w: torch.Tensor, state: LinearQAT, moment: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Per unit, the grid ratio with the least activation-weighted fake-quantization error."""
    scheme, wf = state.scheme, w.float()
    weight = moment.to(wf.device)[None, :].expand_as(wf)  # E[x_k^2] for every element of column k
    best = best_err = None
    for r in grid:
        ratio = torch.full_like(state.weight_ratio, float(r))
        fq = fake_quantize_weight(w, scheme, ratio, state.config.min_ratio).float()
        err = to_units((fq - wf) ** 2 * weight, scheme).sum(dim=1)
        if best is None:
            best, best_err = ratio, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, ratio, best), torch.where(better, err, best_err)
    assert best is not None
    return best
