"""The diffusion math: noise schedules and the forward process, parameterizations and the
training loss (:mod:`.process`), guidance rules (:mod:`.guidance`), the solvers and the one
sampling entry point (:mod:`.solvers`) and the sampling plan's vocabulary (:mod:`.plan`,
torch-free). It works on any ``eps_fn`` and knows nothing of the network, Ray or serving.
"""
