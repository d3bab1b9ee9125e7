"""The small-scale method comparison behind docs/results.md (``python tools/compare.py``).

``plan`` (variants, arguments, configs, reproduction commands, jobs, ETA) -> ``runner``
(each job in-process through the same code as ``loco pretrain`` / ``loco eval`` /
``loco bench``) -> ``collect`` (what exists on disk -> ``summary.json``) -> ``report``
(``docs/results.md`` from the prose template ``report.md``, and the plot).
"""
