"""Sampling from a checkpoint: :class:`~.checkpoint_sampler.CheckpointSampler` binds a
stored network to the diffusion solvers (:mod:`cfgd.diffusion.solvers`) for every
consumer (the sample job, serving, sweeps, evaluation during training), and
:mod:`.tiles` lays samples out as labelled image grids.
"""
