"""Issue 2's acceptance scenario with a real torchvision architecture."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import weightport as wp


def test_resnet18_checkpoint_from_data_parallel_into_a_10_class_model(tmp_path):
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"net": nn.DataParallel(pretrained).state_dict(), "optimizer": {"state": {}}, "epoch": 90}, path)
    model = torchvision.models.resnet18(num_classes=10)
    report = wp.transfer(path, model)
    fresh = {e.target: e for e in report.fresh}
    assert set(fresh) == {"fc.weight", "fc.bias"}
    assert fresh["fc.weight"].reason == "shape mismatch"
    assert (fresh["fc.weight"].source_shape, fresh["fc.weight"].target_shape) == ((1000, 512), (10, 512))
    assert (fresh["fc.bias"].source_shape, fresh["fc.bias"].target_shape) == ((1000,), (10,))
    assert len(report.loaded) == len(report.entries) - 2
    assert report.coverage > 0.999
    assert report.source.wrapper == "net" and report.source.prefixes == ("module.",)
    text = str(report)
    assert "(1000, 512) -> (10, 512)" in text
    model.eval()
    pretrained.eval()
    x = torch.randn(1, 3, 64, 64)
    feats = nn.Sequential(*list(model.children())[:-1])
    ref = nn.Sequential(*list(pretrained.children())[:-1])
    torch.testing.assert_close(feats(x), ref(x), rtol=0, atol=0)
