"""The ranking metrics against values worked out by hand from their definitions."""

import math

import pytest

from longembed.plugin.eval.metrics import mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_of_a_perfect_ranking_is_one_and_of_a_miss_is_zero():
    assert ndcg_at_k(["a", "b", "x"], {"a": 1, "b": 1}) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a": 1}) == 0.0
    assert ndcg_at_k(["a"], {}) == 0.0


def test_ndcg_discounts_by_rank_with_graded_gains():
    # relevant doc at rank 2 (0-based 1): gain 1/log2(3); ideal 1/log2(2) = 1
    assert ndcg_at_k(["x", "a"], {"a": 1}) == pytest.approx(1 / math.log2(3))
    # grades 2 and 1 found in the wrong order
    got = ndcg_at_k(["b", "a"], {"a": 2, "b": 1})
    assert got == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_cutoff_and_duplicates():
    ranked = [f"x{i}" for i in range(10)] + ["a"]
    assert ndcg_at_k(ranked, {"a": 1}, k=10) == 0.0
    assert recall_at_k(ranked, {"a": 1}, k=11) == 1.0
    # a document listed twice counts once and does not push others out of the cutoff
    assert recall_at_k(["a", "a", "b"], {"a": 1, "b": 1}, k=2) == 1.0


def test_recall_and_mrr():
    assert recall_at_k(["a", "x", "b"], {"a": 1, "b": 1, "c": 1}) == pytest.approx(2 / 3)
    assert mrr_at_k(["x", "y", "a"], {"a": 1}) == pytest.approx(1 / 3)
    assert mrr_at_k(["x"], {"a": 1}) == 0.0
    assert mrr_at_k(["a"], {"a": 0}) == 0.0
