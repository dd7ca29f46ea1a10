"""Mixed precision: the trained members train under bf16 autocast on the CPU, while distances,
SSIM's statistics and validation stay float32."""

import warnings

import numpy as np
import pytest
import torch

from models import create_model, model_class, model_names
from models.layers.ssim import ssim
from models.layers.vector_quantizer import ClassCodebooks, nearest_codes
from models.training import autocast, make_optimizer, resolve_precision, train_step

TRAINED = [name for name in model_names() if model_class(name).trains]


def test_auto_precision_is_fp32_on_a_cpu_and_fp16_needs_a_gpu():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    if torch.cuda.is_available():  # wherever CUDA is present, the GPU rule
        assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.parametrize("model", TRAINED)
def test_every_trained_member_trains_under_bf16_autocast(model):
    assert set(TRAINED) >= {"haloae", "hvq_trans", "transformaly"}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_model(model, "fast", image_size=64)
    optimizer = make_optimizer(net, 1e-3)
    before = [p.detach().clone() for p in net.trainable_parameters()]
    batch = {"image": torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "label": torch.zeros(4),
             "class_index": torch.zeros(4, dtype=torch.long)}
    losses = [train_step(net, batch, optimizer, precision="bf16")["loss"] for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert any(not torch.equal(b, p) for b, p in zip(before, net.trainable_parameters()))
    assert all(p.dtype == torch.float32 for p in net.parameters())   # the weights stay float32
    fp32 = [train_step(net, batch, optimizer, precision="fp32")["loss"] for _ in range(1)]
    assert abs(fp32[0] - losses[-1]) < 0.5 * abs(losses[0]) + 1e-3   # the same scale of loss


def test_distances_and_ssim_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    quantiser = ClassCodebooks(num_classes=1, size=256, dim=64, decay=0.99, eps=1e-5, dead_code_threshold=0.0).eval()
    z, index = torch.randn(2, 500, 64, generator=g), torch.zeros(2, dtype=torch.long)
    x, y = torch.rand(2, 8, 32, 32, generator=g), torch.rand(2, 8, 32, 32, generator=g)
    with autocast("bf16", "cpu"):
        in_bf16 = nearest_codes(z, quantiser.embed[index])                   # a bare distance: autocast applies
        quantised_amp, _ = quantiser(z, index)
        ssim_amp = ssim(x, y)
    quantised, _ = quantiser(z, index)
    assert not torch.equal(in_bf16, nearest_codes(z, quantiser.embed[index]))   # bf16 would change codes
    assert torch.equal(quantised_amp, quantised)                            # ... the quantiser's do not
    assert ssim_amp.dtype == torch.float32 and ssim_amp.item() == pytest.approx(ssim(x, y).item(), abs=1e-6)


def test_a_trial_trains_in_bf16_validates_in_float32_and_says_so(synthetic_root):
    import dataclasses

    from distributed.trial import train_loop
    from test_distributed import RecordingSession, diverging_job

    job = dataclasses.replace(diverging_job(synthetic_root, 1e-3), precision="bf16")
    session = RecordingSession()
    assert train_loop(job, session) is True
    assert [m["precision"] for m, _ in session.reports] == ["bf16", "bf16"]
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["val_score"] <= 1 for m, _ in session.reports)
