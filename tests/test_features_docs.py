"""The runnable examples in the feature modules' docstrings stay true."""

import doctest

import pytest

from mechdiff.features import classify, dashboard, store, store_statistics


@pytest.mark.parametrize("module", [store, store_statistics, classify, dashboard], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
