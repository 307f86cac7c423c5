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
