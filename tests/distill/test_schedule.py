"""The learning-rate schedule: warm-up, then cosine decay over the step or the time budget."""

import pytest
from pytorch_lightning.callbacks import Timer

from dmt.distill.module import time_budget_fraction, warmup_cosine


def test_warmup_then_cosine_over_steps():
    assert warmup_cosine(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(52, 4, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 4, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 4, 100, 0.1) == pytest.approx(0.1)


def test_decay_follows_whichever_budget_is_further_spent():
    # Step budget barely touched, time budget half spent: half-way down the cosine.
    assert warmup_cosine(10, 4, 1_000_000, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert warmup_cosine(10, 4, None, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert warmup_cosine(10, 4, None, 0.1) == pytest.approx(1.0)
    # Warm-up is counted in steps whatever the clock says.
    assert warmup_cosine(1, 4, None, 0.1, time_fraction=0.9) == pytest.approx(0.5)


def test_time_budget_fraction(monkeypatch):
    assert time_budget_fraction(None) == 0.0
    assert time_budget_fraction(Timer(duration=None)) == 0.0
    timer = Timer(duration="00:00:01:40")  # 100 s
    monkeypatch.setattr(timer, "time_elapsed", lambda *_: 25.0)
    assert time_budget_fraction(timer) == pytest.approx(0.25)
    monkeypatch.setattr(timer, "time_elapsed", lambda *_: 250.0)
    assert time_budget_fraction(timer) == 1.0
