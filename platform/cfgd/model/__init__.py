"""The network: the UNet denoiser built from a :class:`cfgd.spec.ModelSpec`
(:mod:`.unet`), and the network of a stored checkpoint (:mod:`.from_checkpoint`). It
knows nothing of diffusion, guidance or storage beyond reading a verified checkpoint.
"""
