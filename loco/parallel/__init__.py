"""Stage parallelism for local learning: each local module on its own rank.

``layout`` maps ranks to (stage, replica) and checks the request, ``stage`` runs one rank's
module in the ``sync`` or ``pipelined`` schedule, ``trainer`` is ``loco pretrain`` with
``train.stage_parallel=K``, ``schedule`` predicts the speed-up, ``bench`` measures it.
"""
