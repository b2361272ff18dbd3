"""Research on finished runs: experiments, baselines, summaries, reports, model inspection.

``experiment`` (splits x settings x seeds), ``pooled`` (centralised and local baselines),
``summary`` (tables from a run's per-round log), ``report`` (PNG plots + HTML),
``model_tools`` (model card, explanations, batch checks).
"""
