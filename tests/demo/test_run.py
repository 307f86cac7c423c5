"""The demo's timing (interleaved rounds, medians) and its step count (the progress bar)."""

from __future__ import annotations

import pytest

from qbackend.demo.run import DEMO_PRESETS, DemoOptions, _interleaved_medians_ms, demo_steps


def test_interleaved_rounds_call_every_row_once_per_round_and_take_medians():
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    medians, rounds = _interleaved_medians_ms(calls, budget_s=0.0, min_rounds=4)
    assert rounds == 4 and order == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_rounds_stop_at_the_budget_or_the_cap():
    _, rounds = _interleaved_medians_ms({"a": lambda: None}, budget_s=60.0, min_rounds=1, max_rounds=7)
    assert rounds == 7


@pytest.mark.parametrize("compile_", [True, False])
def test_step_count_matches_the_stages(compile_):
    opts = DemoOptions(presets=("nf4", "w8a8"), compile=compile_, ort=False, llm=False)
    variants = 1 + int(compile_) + 2
    assert demo_steps(opts) == 1 + variants * (1 + len(opts.batches)) + 1


def test_w8a8_is_a_demo_preset_and_in_the_default_run():
    assert "w8a8" in DEMO_PRESETS and "w8a8" in DemoOptions().presets


def test_table_shows_the_kernel_weight_copies_beside_the_size():
    from rich.console import Console

    from qbackend.demo.run import DemoResult, DemoRow, render

    plain = DemoRow("qbackend nf4", 53.4, 5.55, 4.13, {1: 5.0}, {1: 2.0}, {"cosine_mean": 0.97, "cosine_min": 0.96})
    quality = {"cosine_mean": 0.9996, "cosine_min": 0.9995}
    packed = DemoRow("qbackend int8", 58.7, 10.85, 8.06, {1: 6.0}, {1: 1.7}, quality, kernel_copies_mb=10.6)
    console = Console(width=250, record=True)
    console.print(render(DemoResult("m", 1, 2, 2, [plain, packed])))
    lines = console.export_text().splitlines()
    assert any("qbackend int8" in ln and "58.7 + 10.6" in ln for ln in lines)
    assert any("qbackend nf4" in ln and "53.4 " in ln and "53.4 +" not in ln for ln in lines)
