"""Comparing trees of mlx arrays in tests."""

import mlx.core as mx
from mlx.utils import tree_flatten


def assert_trees_equal(a, b) -> None:
    """Same paths, dtypes, shapes and bits (NaN equal to NaN) in both trees."""
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert mx.array_equal(x, y, equal_nan=True).item(), f"{k} differs"
