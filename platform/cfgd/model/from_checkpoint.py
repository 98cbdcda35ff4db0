"""The network of a checkpoint: a :class:`~cfgd.io.checkpoint.Checkpoint`'s weights in a UNet.

The checkpoint (:mod:`cfgd.io.checkpoint`) only reads and verifies files; building the
network from its spec and loading the weights into it happens here, next to the model.
"""

from __future__ import annotations

from cfgd.io.checkpoint import Checkpoint, CheckpointError
from cfgd.model.unet import UNet, build_model


def build_network(ck: Checkpoint, ema: bool = True) -> UNet:
    """The checkpoint's network with EMA (default) or raw weights, in eval mode, on the CPU.

    Raises CheckpointError naming the checkpoint when the weights do not fit the spec.
    """
    state = ck.ema_state if ema else ck.model_state
    if state is None:
        raise CheckpointError(f"checkpoint {ck.path} was read without its weights")
    model = build_model(ck.spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        first = str(err).strip().splitlines()
        raise CheckpointError(f"checkpoint {ck.path} does not fit its model spec: "
                              f"{' '.join(first[:3])[:400]}") from None
    return model.eval()
