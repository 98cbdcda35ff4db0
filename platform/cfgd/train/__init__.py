"""Training on Ray Train: the trainer (:mod:`.trainer`, ``fit``), the loop every worker
runs (:mod:`.worker`) with its checkpoints (:mod:`.worker_checkpoints`), the EMA and the
learning-rate schedule, the Ray Data input pipeline, the resume point (:mod:`.resume`)
and evaluation of checkpoints while training runs (:mod:`.checkpoint_eval`).
"""
