"""The independent reference (tests/reference): its own invariants, checked without the library."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import (
    PRESETS,
    ReferenceMIMO,
    TrainConfig,
    augment_crop_flip,
    cutmix_probability,
    draw_mix,
    evaluate,
    loss_weights,
    make_rows,
    sharing_rates,
    train,
    truncated_he_normal,
    unmix_pool,
)
from reference.train import channel_stats, lr_factor


def test_reference_imports_nothing_from_the_library():
    """Import it in a fresh interpreter: the library must not get loaded, and no file names it in an import."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import reference

    folder = Path(reference.__file__).parent
    for path in folder.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+mixshare_layers", path.read_text(), re.M), path.name
    code = "import sys, reference; print(any(m.startswith('mixshare_layers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=folder.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cutmix_masks_are_binary_boxes_summing_to_one_with_realised_ratios():
    rng = np.random.default_rng(0)
    mix = draw_mix(rng, 64, 2, 32, 32, alpha=2.0, cutmix_prob=1.0)
    assert mix.cutmix
    m = mix.masks
    assert torch.equal(m.sum(dim=1), torch.ones(64, 32, 32, dtype=m.dtype))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(mix.ratios, m.mean(dim=(2, 3)))
    owner = m[:, mix.owner]
    for b in range(64):  # the owner's mask is exactly its box
        y0, y1, x0, x1 = mix.boxes[b]
        box = torch.zeros(32, 32, dtype=m.dtype)
        box[y0:y1, x0:x1] = 1
        assert torch.equal(owner[b], box)


def test_linear_mix_and_mimo_are_constant_masks():
    rng = np.random.default_rng(1)
    mix = draw_mix(rng, 16, 3, 8, 8, alpha=2.0, cutmix_prob=0.0)
    assert not mix.cutmix and not mix.boxes.any()
    assert torch.allclose(mix.masks, torch.from_numpy(mix.lam)[:, :, None, None].expand(16, 3, 8, 8))
    mimo = draw_mix(rng, 4, 4, 8, 8, alpha=0.0, cutmix_prob=0.0)
    assert torch.equal(mimo.masks, torch.full((4, 4, 8, 8), 0.25, dtype=torch.float64))


def test_three_members_cutmix_shares_the_outside_by_lambda():
    rng = np.random.default_rng(2)
    mix = draw_mix(rng, 32, 3, 16, 16, alpha=2.0, cutmix_prob=1.0)
    others = [j for j in range(3) if j != mix.owner]
    outside = 1 - mix.masks[:, mix.owner]
    lam = torch.from_numpy(mix.lam)
    for j in others:
        expected = outside * (lam[:, j] / lam[:, others].sum(dim=1))[:, None, None]
        assert torch.allclose(mix.masks[:, j], expected)
    assert torch.allclose(mix.masks.sum(dim=1), torch.ones(32, 16, 16, dtype=torch.float64))


def test_owner_realised_area_and_per_batch_roles():
    """MixMo's sampler: at 32x32 with Beta(2, 2) the box owner's realised share averages about 0.306."""
    rng = np.random.default_rng(3)
    areas, owners = [], []
    for _ in range(200):
        mix = draw_mix(rng, 100, 2, 32, 32, alpha=2.0, cutmix_prob=1.0)
        areas.append(mix.ratios[:, mix.owner])
        owners.append(mix.owner)
    area = torch.cat(areas)
    se = float(area.std()) / math.sqrt(area.numel())
    assert abs(float(area.mean()) - 0.306) < 4 * se + 0.002
    assert 70 <= sum(owners) <= 130  # owner drawn per batch, uniform over the 2 members
    coins = [draw_mix(rng, 2, 2, 8, 8, alpha=2.0, cutmix_prob=0.5).cutmix for _ in range(400)]
    assert 160 <= sum(coins) <= 240


def test_cutmix_probability_ramp():
    assert cutmix_probability(0.5, 1 / 12, 0.0) == 0.5
    assert cutmix_probability(0.5, 1 / 12, 11 / 12 - 1e-9) == 0.5
    assert cutmix_probability(0.5, 1 / 12, 23 / 24) == pytest.approx(0.25)
    assert cutmix_probability(0.5, 1 / 12, 1.0) == 0.0
    assert cutmix_probability(1.0, 0.0, 0.99) == 1.0


def test_loss_weights():
    ratios = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(loss_weights(ratios, 1.0), 2 * ratios)
    w3 = loss_weights(ratios, 3.0)
    assert torch.allclose(w3.sum(dim=1), torch.full((2,), 2.0, dtype=torch.float64))
    assert torch.allclose(w3[0, 1] / w3[0, 0], torch.tensor(3.0, dtype=torch.float64) ** (1 / 3))
    assert torch.equal(loss_weights(ratios, None), torch.ones_like(ratios))


def test_unmix_pool_modes():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    masks = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    masks[:, 0, :8] = 1  # member 0 owns the top half, member 1 the bottom half
    masks[:, 1] = 1 - masks[:, 0]
    full = unmix_pool(f, masks, "full")
    assert torch.allclose(full[:, 0], f[:, :, :2].mean(dim=(2, 3)))
    assert torch.allclose(full[:, 1], f[:, :, 2:].mean(dim=(2, 3)))
    assert torch.allclose(unmix_pool(f, masks, "none"), f.mean(dim=(2, 3))[:, None].expand(2, 2, 8))
    assert torch.allclose(unmix_pool(f, masks, "fadeout", strength=1.0), f.mean(dim=(2, 3))[:, None].expand(2, 2, 8))
    partial = unmix_pool(f, masks, "partial", fraction=0.25)
    assert torch.allclose(partial[..., :2], full[..., :2])
    assert torch.allclose(partial[..., 2:], f.mean(dim=(2, 3))[:, None, 2:].expand(2, 2, 6))
    # a cell half covered counts half: masks averaged to the final grid
    masks2 = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    masks2[:, 0, :, :1] = 1
    masks2[:, 1] = 1 - masks2[:, 0]
    g = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)
    pooled = unmix_pool(g, masks2, "full")
    assert torch.allclose(pooled[0, 0, 0], g[0, 0, :, 0].mean())
    with pytest.raises(ValueError, match="divide"):
        unmix_pool(f, torch.ones(2, 2, 10, 10, dtype=torch.float64) / 2, "full")


@pytest.mark.parametrize("input_repetition", [0.0, 0.1, 0.5])
def test_make_rows_repetition_and_input_repetition(input_repetition):
    rng = np.random.default_rng(4)
    indices = np.arange(100, 132)
    rows = make_rows(rng, indices, 3, 2, input_repetition)
    assert rows.shape == (64, 3)
    for i in range(3):  # every member sees every image exactly twice
        values, counts = np.unique(rows[:, i], return_counts=True)
        assert np.array_equal(values, indices) and (counts == 2).all()
    same = (rows == rows[:, :1]).all(axis=1).sum()
    assert same >= round(input_repetition * 64)
    if input_repetition == 0.0:
        assert same <= 8  # chance coincidences only


def test_augment_crop_flip_is_a_window_of_the_padded_image():
    rng = np.random.default_rng(5)
    x = torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8)
    out = augment_crop_flip(rng, x, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(20):
        found = any(
            torch.equal(out[k], c) or torch.equal(out[k], c.flip(-1))
            for dy in range(5)
            for dx in range(5)
            for c in [padded[k, :, dy : dy + 8, dx : dx + 8]]
        )
        assert found


def test_truncated_he_normal():
    torch.manual_seed(0)
    w = truncated_he_normal(torch.empty(256, 64, 3, 3))
    std = math.sqrt(2 / 576)
    assert float(w.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-7
    assert abs(float(w.std()) / std - 1) < 0.02


def test_model_shapes_init_and_sharing():
    torch.manual_seed(0)
    model = ReferenceMIMO(10, 2, depth=10, width=2, encoder_init="aligned")
    assert torch.equal(model.encoders[0].weight, model.encoders[1].weight)
    assert all(not h.bias.detach().any() for h in model.heads)
    x = torch.randn(3, 2, 3, 16, 16)
    masks = torch.full((3, 2, 16, 16), 0.5)
    assert model.forward_train(x, masks).shape == (3, 2, 10)
    model.eval()
    assert model.forward_eval(x[:, 0]).shape == (3, 2, 10)
    assert sharing_rates(model)["encoder_sharing"] == 100.0
    with pytest.raises(ValueError, match="bad depth"):
        ReferenceMIMO(10, depth=11)


def test_eval_summed_encoders_equal_a_training_forward_with_the_same_image_and_full_masks():
    """At test time each encoder sees the image; with masks 1/M the training mix M * sum m_i l_i is that sum."""
    torch.manual_seed(1)
    model = ReferenceMIMO(5, 3, depth=10).double()
    model.eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    train_path = model.forward_train(x[:, None].expand(4, 3, 3, 16, 16), torch.full((4, 3, 16, 16), 1 / 3).double())
    assert torch.allclose(train_path, model.forward_eval(x))


def test_train_and_evaluate_run_for_every_preset():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (64, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(64) % 4
    mean, std = channel_stats(images)
    for preset in PRESETS:
        model = train(TrainConfig(preset=preset, depth=10, steps=2, batch=8), images, labels, seed=0)
        out = evaluate(model, images, labels, mean, std)
        assert 0 <= out["ensemble_acc"] <= 100 and len(out["individual_acc"]) == 2
        assert out["nll"] > 0


def test_lr_factor_warmup_then_linear_decay():
    assert lr_factor(0, 100, 0.05) == pytest.approx(0.2)
    assert lr_factor(4, 100, 0.05) == 1.0
    assert lr_factor(5, 100, 0.05) == 1.0
    assert lr_factor(99, 100, 0.05) == pytest.approx(1 / 95)
