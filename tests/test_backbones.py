"""Frozen CNN backbones: BatchNorm folding and channels-last must not change the maps."""

import copy

import pytest
import timm
import torch
from torch import nn

from models import backbones


def with_random_batch_norm_statistics(net: nn.Module) -> nn.Module:
    """Untrained BatchNorms are the identity (mean 0, var 1): give them statistics worth folding."""
    generator = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator))
    return net.eval()


def assert_same_maps(reference: nn.Module, optimized: nn.Module, size: int = 80) -> None:
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = reference(images)
        got = backbones.cnn_maps(optimized, images)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.is_contiguous()
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


@pytest.mark.parametrize("arch, out_indices, batch_norms", [
    ("tf_efficientnet_lite0", (1, 2, 3), 48),
    ("resnet18", (1, 2), 10),
    ("vgg19_bn", (1, 2), 8),
])
def test_folding_removes_every_batch_norm_and_keeps_the_maps(arch, out_indices, batch_norms):
    net = with_random_batch_norm_statistics(
        timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices))
    reference = copy.deepcopy(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == batch_norms
    optimized = backbones.optimize_frozen_cnn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    assert not any(p.requires_grad for p in optimized.parameters()) and not optimized.training
    assert_same_maps(reference, optimized)


def test_packaged_efficientnet_backbone_is_folded_and_unchanged():
    arch = "tf_efficientnet_lite0"
    plain = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2)).eval()
    backbones.load_weights_into(plain, arch, "packaged")
    optimized, label = backbones.create_feature_backbone(arch, "packaged", (1, 2))
    assert label == "packaged"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    assert_same_maps(plain, optimized)


class ConvOutputUsedTwice(nn.Module):
    """conv -> BatchNorm in registration order, but the conv's output is also used unnormalised."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return [self.bn(y) + y]


def test_a_fold_that_would_change_the_outputs_is_not_applied():
    net = with_random_batch_norm_statistics(ConvOutputUsedTwice())
    reference = copy.deepcopy(net)
    optimized = backbones.optimize_frozen_cnn(net)
    assert isinstance(optimized.bn, nn.BatchNorm2d)  # the unfolded network came back
    assert_same_maps(reference, optimized)


def test_unfolded_state_dicts_are_folded_on_load():
    arch = "tf_efficientnet_lite0"
    unfolded = with_random_batch_norm_statistics(
        timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2)))
    folded = backbones.optimize_frozen_cnn(copy.deepcopy(unfolded))
    state = {f"backbone.{k}": v for k, v in unfolded.state_dict().items()}
    converted = backbones.fold_state_dict(state, "backbone.", folded.folded_batch_norms)
    expected = {f"backbone.{k}": v for k, v in folded.state_dict().items()}
    assert set(converted) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-6)


def test_checkpoint_written_before_folding_loads_with_the_same_maps(tmp_path):
    """A checkpoint of an older version holds conv + BatchNorm tensors; it must still load."""
    import warnings

    from models import checkpoint_files, create_model, load_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random backbone
        model = create_model("hvq_trans", weights="none", image_size=32, out_indices=(1, 2), embed_dim=16,
                             decoder_dim=32, num_heads=2, ffn_dim=32, levels=2, codebook_size=8).eval()
    checkpoint = model.checkpoint()
    state = checkpoint["state_dict"]
    # the same network written unfolded: conv weight W, BatchNorm with mean 0, var 1 - eps, beta = b
    for conv, bn, eps in model.backbone.folded_batch_norms:
        c, b = f"backbone.{conv}", f"backbone.{bn}"
        if f"{c}.weight" not in state:
            continue  # a stage HVQ-Trans cut off after folding
        out = state[f"{c}.weight"].shape[0]
        state[f"{b}.bias"] = state.pop(f"{c}.bias")
        state[f"{b}.weight"] = torch.ones(out)
        state[f"{b}.running_mean"] = torch.zeros(out)
        state[f"{b}.running_var"] = torch.full((out,), 1 - eps)
        state[f"{b}.num_batches_tracked"] = torch.tensor(0)
    checkpoint_files.write(tmp_path / "old.safetensors", checkpoint_files.encode_model(checkpoint))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(tmp_path / "old.safetensors").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.anomaly_map(images), model.anomaly_map(images))
