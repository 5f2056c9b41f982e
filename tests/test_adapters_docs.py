"""The runnable examples in the adapters' docstrings (they use the shipped organism and adapters)."""

import doctest

import pytest
import torch

from mechdiff.adapters import formats, transcoder
from mechdiff.adapters.transcoder import SHIPPED_DIR
from mechdiff.evaluation import faithfulness
from mechdiff.models import ORGANISM_DIR
from mechdiff.training import adapter_objective


@pytest.mark.skipif(not (SHIPPED_DIR / "adapters.json").exists() or not (ORGANISM_DIR / "target").exists(),
                    reason="no shipped organism / adapters")
@pytest.mark.parametrize("module", [transcoder, formats, adapter_objective, faithfulness])
def test_docstring_examples_run(module):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0 and result.failed == 0
