"""The README's main job (interim): port a saved torchvision resnet18 checkpoint into a 10-class model."""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from torch import nn


def main() -> int:
    import torchvision

    import weightport as wp

    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet18_checkpoint.pth")
        torch.save({"net": nn.DataParallel(pretrained).state_dict(), "optimizer": {}, "epoch": 90}, path)
        model = torchvision.models.resnet18(num_classes=10)
        report = wp.transfer(path, model)
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
