"""Studies: each a function with a typed config in and a typed result out.

``mechdiff.studies.hesitation.run(pair, adapted, HesitationConfig(...)) -> HesitationResult`` traces
the hesitation token to adapter features and tests them; ``python -m analyses.hesitation`` is a thin
caller that writes the result's figures and summary. Nothing here writes files unless asked
(:meth:`HesitationResult.write`).
"""
