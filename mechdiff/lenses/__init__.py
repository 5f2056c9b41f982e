"""Model-diffing lenses, each scored against the organism's ground truth (``python -m analyses.lenses``).

One module per lens, each with its own natural ranking of hesitation units:

* :mod:`~mechdiff.lenses.transcoder` - transcoder adapters, graph or activation x gradient ranking;
* :mod:`~mechdiff.lenses.lora_sae` - the rank-1 LoRA and a SAE on its state;
* :mod:`~mechdiff.lenses.crosscoder` - a BatchTopK crosscoder on base and target, with Latent Scaling;
* :mod:`~mechdiff.lenses.activation_difference` - the mean target-minus-base residual at the hesitation slot;
* :mod:`~mechdiff.lenses.kl` - token-level KL between the two models (names tokens, not units).

Shared: :mod:`~mechdiff.lenses.context` (what every lens is scored on), :mod:`~mechdiff.lenses.scoring`
(the one label rule, necessity, agreement), :mod:`~mechdiff.lenses.paired` (generation edited from a
second model's activations), :mod:`~mechdiff.lenses.cost` (CPU seconds and memory measured per phase,
or seconds recorded when a reused artefact was trained), :mod:`~mechdiff.lenses.report` (figures and report.md).
"""
