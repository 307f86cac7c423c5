"""Sampled weight fingerprints: the sampled places stay inside the tensor at every size."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from qbackend.passes.weight_stamp import ELEMENTS, WeightStamp, sample_positions


@given(st.one_of(st.integers(1, 10_000), st.integers(2**24, 2**40), st.just(128256 * 4096)))
def test_sample_positions_stay_inside(numel: int) -> None:
    # 128256 x 4096 is Llama-3's lm_head: an fp32 linspace put its last sample at numel (one past the end).
    pos = sample_positions(numel)
    assert pos.dtype == torch.int64
    assert int(pos.min()) == 0 and int(pos.max()) == numel - 1
    assert len(pos) == min(numel, ELEMENTS)
    assert bool((pos[1:] > pos[:-1]).all())


def test_strided_stamp_sees_a_data_write() -> None:
    w = torch.randn(300, 200).t()  # non-contiguous: the single-element sampling path
    stamp = WeightStamp(w)
    assert stamp.matches(w)
    w.data.mul_(2.0)  # bypasses the version counter; touches every sampled element
    assert not stamp.matches(w)
