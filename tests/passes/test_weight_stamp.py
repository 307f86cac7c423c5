"""Sampled weight fingerprints: the sampled places stay inside the tensor at every size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qbackend.passes.weight_stamp import ELEMENTS, DeviceProbes, WeightStamp, sample_positions


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


def test_read_byte_runs_reads_each_address() -> None:
    from qbackend.kernels.triton.probe import read_byte_runs

    a = torch.randn(100)
    b = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    addrs = torch.tensor([a.data_ptr() + 16, b.data_ptr() + 500, b.data_ptr()], dtype=torch.int64)
    got = read_byte_runs(addrs, 64)
    assert torch.equal(got[0], a.view(torch.uint8)[16:80])
    assert torch.equal(got[1], b[500:564]) and torch.equal(got[2], b[:64])
    assert read_byte_runs(addrs[:0], 64).shape == (0, 64)
    with pytest.raises(ValueError, match="run must be a power of two, got 48"):
        read_byte_runs(addrs, 48)
    with pytest.raises(ValueError, match=r"addresses must be 1-D int64, got torch.int32 \(3,\)"):
        read_byte_runs(addrs.int(), 64)


def test_device_probes_find_exactly_the_changed_weights(monkeypatch) -> None:
    from qbackend.passes import weight_stamp

    monkeypatch.setattr(weight_stamp, "PROBED_DEVICES", {"cpu"})
    ws = [torch.randn(64, 48) for _ in range(3)] + [torch.randn(300, 7)]
    stamps = [WeightStamp(w) for w in ws]
    assert all(s._addrs is not None for s in stamps)  # every one took the device path
    probes = DeviceProbes()

    def check() -> set[int]:
        with probes.collecting():
            assert all(s.matches(w) for s, w in zip(stamps, ws, strict=True))  # deferred: provisionally fine
        return probes.stale()

    assert check() == set()
    ws[1].data[-1, -1] += 1.0  # the last sampled run ends at the last byte
    ws[3].data.mul_(3.0)
    assert check() == {1, 3}
    assert not stamps[1].matches(ws[1]) and stamps[0].matches(ws[0])  # outside a batch: read at once
    assert WeightStamp(torch.zeros(4))._addrs is None  # smaller than one run: not probed
