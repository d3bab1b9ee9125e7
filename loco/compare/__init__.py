"""The small-scale measurements behind docs/results.md (``python tools/compare.py``).

``sections`` (what each section of the page trains and where) -> ``plan`` (arguments,
configs, reproduction commands, protocol pin, jobs, ETA) -> ``runner`` (each job in-process
through the same code as ``loco pretrain`` / ``loco eval`` / ``loco bench``, stage-parallel
rows under torchrun) -> ``collect`` (what exists on disk -> ``summary.json``) -> the reports
(``report`` with its prose templates ``report.md`` / ``presnet.md``, ``report_stage``,
``report_objectives``) -> ``write`` and ``page`` (the section's block of docs/results.md).
"""
