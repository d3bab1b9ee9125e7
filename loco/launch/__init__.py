"""Slurm launch through submitit: ``loco submit`` (:mod:`loco.launch.submit`), ``loco jobs``
(:mod:`loco.launch.status`) and the callable that runs on the nodes (:mod:`loco.launch.entry`).

Plain sbatch templates (torchrun under srun) for users who do not want submitit live in
``slurm/``; see ``slurm/README.md``.
"""
