"""The one tolerance rule (graph_passes/tolerance.py): an element fails only past atol AND rtol*|r|,
in the parity report and in the per-pass check alike."""

from __future__ import annotations

import numpy as np

from exporter.compare import compare_arrays
from graph_passes.tolerance import Tolerance, within

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def test_an_element_fails_only_past_both_bounds():
    reference = np.array([0.1, 0.1, 10.0, 0.0, 0.0], dtype=np.float32)
    # off by: 0.9e-4 (inside atol), 1.5e-4 (past atol and past rtol*0.1 = 1e-4), 5e-3 (past atol,
    # inside rtol*10 = 1e-2), 0.5e-4 and 2e-4 on a zero reference (inside and past atol)
    off = np.array([0.9e-4, 1.5e-4, 5e-3, 0.5e-4, 2e-4])
    actual = reference.astype(np.float64) + off
    passing = [within(actual[i:i + 1], reference[i:i + 1], TOL) for i in range(5)]
    assert passing == [True, False, True, True, False]
    # np.allclose's rule (|a - r| <= atol + rtol*|r| = 2e-4) would have let the second one through
    assert np.allclose(actual[1], reference[1], atol=TOL.atol, rtol=TOL.rtol)


def test_parity_counts_the_same_elements_as_the_pass_check():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 32)).astype(np.float32)
    actual = reference + rng.normal(0, 2e-4, reference.shape).astype(np.float32)
    comparison = compare_arrays("y", actual, reference, TOL)
    by_element = sum(not within(a, r, TOL) for a, r in zip(actual.ravel(), reference.ravel()))
    assert 0 < comparison.mismatches == by_element < actual.size
    assert not within(actual, reference, TOL)


def test_nan_and_inf_fail():
    reference = np.ones(3, dtype=np.float32)
    for bad in (np.nan, np.inf):
        actual = reference.copy()
        actual[1] = bad
        assert not within(actual, reference, TOL)
        assert compare_arrays("y", actual, reference, TOL).nonfinite == 1
