"""The runnable examples in the attribution package's docstrings run and give what they show."""

import doctest
import importlib

import pytest
import torch

MODULES = [
    "__init__",
    "linearize",
    "targets",
    "build",
    "gradient",
    "graph",
    "export",
    "interventions",
    "synthetic",
    "plot",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = importlib.import_module("attribution" if name == "__init__" else f"attribution.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_num_threads(old)
    assert result.failed == 0
    assert result.attempted > 0
