"""passes.report: the float-layer record every workflow starts from, and sections merged across graphs."""

from __future__ import annotations

import torch

from qbackend.passes.report import Report, float_row


def test_float_row_shape_bits_and_bytes():
    w = torch.zeros(8, 3, dtype=torch.float16)  # stored [in, out]: a Conv1D weight
    row = float_row("h.0.attn", "h.0.attn.weight", w, transposed=True, forms=("conv1d",), reason="too small")
    assert row.shape == (3, 8) and row.transposed and not row.quantized and row.reason == "too small"
    assert row.bits_per_param == 16.0 and row.bytes_before == row.bytes_after == 48
    row = float_row("fc", "fc.weight", torch.zeros(5, 7), transposed=False, forms=("linear",))
    assert row.shape == (5, 7) and row.bits_per_param == 32.0 and row.bytes_before == 140


def test_sections_merge_across_graphs():
    a = Report([float_row("a", "a.weight", torch.zeros(2, 2), transposed=False, forms=("linear",))], 1,
               {"smoothquant": ["fold-a"]})  # fmt: skip
    b = Report([], 1, {"smoothquant": ["fold-b"], "other": [1]})
    merged = a.merge([b])
    assert merged.sections == {"smoothquant": ["fold-a", "fold-b"], "other": [1]}
    assert a.sections == {"smoothquant": ["fold-a"]}  # the inputs are not changed
    assert merged.graphs == 2 and len(merged.layers) == 1
