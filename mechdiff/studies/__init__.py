"""Studies: each a function with a typed config in and a typed result out.

``mechdiff.studies.hesitation.run(pair, adapted, HesitationConfig(...)) -> HesitationResult`` traces
the hesitation token to adapter features and tests them; ``python -m analyses.hesitation`` is a thin
caller that writes the result's figures and summary. The others follow the same shape:

- ``organisms.run``: the hesitation study, unchanged, on every organism of the family;
- ``lora.run(pair, LoraStudyConfig(...)) -> LoraStudyResult``: the rank-1 LoRA lens and its SAE;
- ``features.run(pair, adapted, FeaturesConfig(...)) -> FeaturesResult``: dashboards and the
  reasoning-feature census, on any pair's workload;
- ``real.run(RealConfig(...), out) -> RealResult``: the SmolLM2 study, staged and resumable in ``out``.

Each result has ``summary()`` (what ``summary.json`` holds), ``figures()`` (plotly figures) and
``report()``. Nothing here writes files unless asked (``result.write(out)``; the real study keeps
its stages' JSON in ``out`` so a killed run resumes).
"""
