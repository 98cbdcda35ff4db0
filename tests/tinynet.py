"""The tests' stand-in for a trained network: the tiny UNet on 8x8x1 images, 10 classes."""

import torch

from cfgd.model.unet import build_model
from cfgd.spec import ModelSpec


def tiny_net(seed: int = 0) -> torch.nn.Module:
    """Seeded, in eval mode, every parameter perturbed: zero-initialised output layers make
    a fresh net predict 0 everywhere, so labels and timesteps would not change its output."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec("tiny", image_size=8, in_channels=1, num_classes=10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
