"""Continual-learning metrics against matrices computed by hand."""

from __future__ import annotations

import pytest

from clipcl.metrics import continual_metrics


def test_three_tasks_by_hand() -> None:
    matrix = [
        [0.9],
        [0.7, 0.8],
        [0.5, 0.6, 0.95],
    ]
    sizes = [100, 300, 100]
    metrics = continual_metrics(matrix, sizes)
    # acc_1 = 0.9; acc_2 = (0.7*100 + 0.8*300) / 400 = 0.775; acc_3 = (50 + 180 + 95) / 500 = 0.65
    assert metrics.accuracy_after_task == pytest.approx([0.9, 0.775, 0.65])
    assert metrics.avg == pytest.approx((0.9 + 0.775 + 0.65) / 3)
    assert metrics.last == pytest.approx(0.65)
    # task 1: max(0.9, 0.7) - 0.5 = 0.4; task 2: max(0.8) - 0.6 = 0.2
    assert metrics.forgetting == pytest.approx(0.3)
    # task 1: 0.5 - 0.9 = -0.4; task 2: 0.6 - 0.8 = -0.2
    assert metrics.bwt == pytest.approx(-0.3)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first() -> None:
    matrix = [[0.5], [0.8, 0.9], [0.6, 0.9, 0.7]]
    metrics = continual_metrics(matrix, [10, 10, 10])
    assert metrics.forgetting == pytest.approx(((0.8 - 0.6) + (0.9 - 0.9)) / 2)
    assert metrics.bwt == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)  # backward transfer can be positive


def test_one_task_has_no_forgetting_and_missing_entries_are_left_out() -> None:
    single = continual_metrics([[0.75]], [4])
    assert (single.avg, single.last, single.forgetting, single.bwt) == (0.75, 0.75, None, None)
    gap = continual_metrics([[0.9], [None, 0.6]], [10, 30])
    assert gap.accuracy_after_task == pytest.approx([0.9, 0.6])  # task 1's images were gone after task 2
    assert gap.forgetting is None and gap.bwt is None


def test_sizes_must_cover_every_task() -> None:
    with pytest.raises(ValueError, match="held-out sizes"):
        continual_metrics([[0.5], [0.5, 0.5]], [10])
