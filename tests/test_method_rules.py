"""The method's rules, checked where the library's own parts (presets, sampler, batcher, schedules) enter.

``tests/test_differential.py`` feeds the reference's batches and mixes into the library, so it checks the library's
arithmetic but never its preset values, its sampler or its batcher. This file checks those against the independent
reference (``tests/reference``, written from the paper), and each test is built so that it cannot pass vacuously:

* the preset table, field by field, against the reference's table (and that table against the paper's numbers);
* lock-step float64 SGD steps of the library and the reference for every preset at every schedule offset, with
  CutMix boxes owned by each member, masks that cut the final feature cells, and (where the schedule says so)
  unmixing that changes what each head sees, all asserted inside the test;
* the wrapper's own sampler (Beta(alpha) λ, CutMix probability and its ramp, box owner, realised area, scale M) and
  batcher (batch repetition, per-member shuffles, input repetition), in distribution against the reference (fixed
  seeds, tolerances stated where they are used) and by exact invariants;
* encoder alignment, the fadeout schedule, the loss weights, eval summing, folding and the heads' initialisation.

``benchmarks/mutations.py`` breaks the library on purpose, one rule at a time, and checks that these tests notice.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.differential import mix_to_info
from mixshare_layers import PRESETS, BackboneSplit, MIMOConfig, MIMOWrapper
from mixshare_layers.deploy import fold
from mixshare_layers.models import wide_resnet

PRESET_NAMES = ("mimo", "mixmo", "unmix", "unmix-aligned", "mixshare", "mixshare-partial")

# library MIMOConfig field -> reference PRESETS key (written independently, from the paper)
FIELD_MAP = {
    "encoder_init": "encoder_init",
    "alpha": "alpha",
    "cutmix_prob": "cutmix_prob",
    "cutmix_ramp": "ramp",
    "unmix_mode": "unmix",
    "unmix_fraction": "fraction",
    "fadeout_end": "fadeout_end",
    "rebalance_root": "root",
    "input_repetition": "input_repetition",
}
# library fields the reference fixes in its code rather than in its table: ``draw_mix`` draws the box owner once
# per batch (MixMo shuffles the roles per batch), ``unmix_pool`` divides each member's masked sum by its mask mass
REFERENCE_CONSTANTS = {"shuffle_roles": True, "unmix_pooling": "mean"}

# The paper's numbers (docs: REFERENCE.md sections 2-4), for the reference's table
PAPER = {
    "mimo": {"alpha": 0.0, "cutmix_prob": 0.0, "unmix": "none", "root": None, "input_repetition": 0.0},
    "mixmo": {"encoder_init": "independent", "alpha": 2.0, "cutmix_prob": 0.5, "ramp": 1 / 12, "unmix": "none",
              "root": 3.0, "input_repetition": 0.0},
    "unmix": {"encoder_init": "independent", "cutmix_prob": 0.5, "unmix": "full", "root": 3.0},
    "unmix-aligned": {"encoder_init": "aligned", "cutmix_prob": 0.5, "unmix": "full", "root": 3.0},
    # CutMix always, 10 % input repetition, the plain ratios (r = 1), fadeout by epoch 100 of 300
    "mixshare": {"encoder_init": "aligned", "alpha": 2.0, "cutmix_prob": 1.0, "ramp": 0.0, "unmix": "fadeout",
                 "fadeout_end": 1 / 3, "root": 1.0, "input_repetition": 0.1},
    "mixshare-partial": {"encoder_init": "aligned", "cutmix_prob": 1.0, "ramp": 0.0, "unmix": "partial",
                         "fraction": 0.25, "root": 1.0, "input_repetition": 0.1},
}  # fmt: skip


def _same(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)


def _wrapper(preset: str, m: int = 2, seed: int = 0, num_classes: int = 5, **overrides) -> MIMOWrapper:
    torch.manual_seed(seed)
    return MIMOWrapper(wide_resnet(10, 1, num_classes=num_classes), m, preset, **overrides)


# -- 1. the preset table ---------------------------------------------------------------------------------------------
def test_the_field_map_covers_both_tables():
    """Every field of the library's config is mapped to the reference's table or to one of its fixed rules."""
    library_fields = {f.name for f in dataclasses.fields(MIMOConfig)}
    assert library_fields == set(FIELD_MAP) | set(REFERENCE_CONSTANTS)
    assert set(PRESETS) == set(ref.PRESETS) == set(PRESET_NAMES) == set(PAPER)
    for name, method in ref.PRESETS.items():
        assert set(method) == set(FIELD_MAP.values()), name


def test_the_reference_table_has_the_papers_numbers():
    for name, values in PAPER.items():
        for key, value in values.items():
            assert _same(ref.PRESETS[name][key], value), (name, key, ref.PRESETS[name][key], value)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_library_presets_match_the_reference_field_by_field(preset):
    config = PRESETS[preset]
    method = ref.PRESETS[preset]
    wrong = {
        field: (getattr(config, field), method[key])
        for field, key in FIELD_MAP.items()
        if not _same(getattr(config, field), method[key])
    }
    wrong.update({f: (getattr(config, f), v) for f, v in REFERENCE_CONSTANTS.items() if getattr(config, f) != v})
    assert not wrong, f"{preset}: library vs reference {wrong}"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_wrapper_builds_its_parts_from_the_preset(preset):
    """The values reach the modules that use them (not only the config object)."""
    model = _wrapper(preset)
    method = ref.PRESETS[preset]
    mixer, unmixer = model.mixer, model.unmixer
    assert (mixer.alpha, mixer.cutmix_prob, mixer.cutmix_ramp) == pytest.approx(
        (method["alpha"], method["cutmix_prob"], method["ramp"])
    )
    assert mixer.shuffle_roles is True and mixer.scale == 2.0
    assert model.encoder.init == method["encoder_init"]
    assert unmixer.mode == method["unmix"] and unmixer.pooling == "mean"
    assert (unmixer.fraction, unmixer.fadeout_end) == pytest.approx((method["fraction"], method["fadeout_end"]))
    assert model.make_batcher(2).input_repetition == pytest.approx(method["input_repetition"])


# -- 2. lock-step: CutMix and unmixing at every offset ---------------------------------------------------------------
SIZE, ROWS, CLASSES = 16, 16, 5  # 16x16 images: 4x4 final maps, so a box edge can cut a final cell


@torch.no_grad()
def _copy_weights(lib: MIMOWrapper, other: ref.ReferenceMIMO) -> None:
    """Library -> reference: the cores tensor by tensor (same registration order), encoders and heads by member."""
    src = [*lib.core.parameters(), *lib.core.buffers()]
    dst = [*other.core.parameters(), *other.core.buffers()]
    assert [t.shape for t in src] == [t.shape for t in dst]
    for s, d in zip(src, dst, strict=True):
        d.copy_(s)
    for i, (enc, head) in enumerate(zip(other.encoders, other.heads, strict=True)):
        enc.weight.copy_(lib.encoder.kernels()[i])
        head.weight.copy_(lib.heads.weight[i])
        head.bias.copy_(lib.heads.bias[i])


def _draw(rng: np.random.Generator, n: int, m: int, alpha: float, cutmix: bool, owner: int | None) -> ref.Mix:
    """A reference draw, CutMix or linear, with the given box owner (redrawn until it has it)."""
    for _ in range(200):
        mix = ref.draw_mix(rng, n, m, SIZE, SIZE, alpha, 1.0 if cutmix else 0.0)
        if owner is None or mix.owner == owner:
            return mix
    raise AssertionError(f"no draw owned by member {owner} in 200 tries")


def _lockstep(preset: str, offset: float, m: int = 2, seed: int = 0) -> dict:
    """SGD steps of both implementations from the same weights on the same batches and mixes (float64).

    Steps: CutMix owned by member 0, by member 1 (by 2 for M = 3), a linear mix, then one draw at the preset's own
    CutMix probability for that progress. Returns the largest differences and what the steps exercised.
    """
    method = ref.PRESETS[preset]
    dtype = torch.float64
    lib = _wrapper(preset, m, seed, CLASSES).to(dtype)
    other = ref.ReferenceMIMO(CLASSES, m, 10, 1, method["encoder_init"]).to(dtype)
    _copy_weights(lib, other)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (ROWS, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(CLASSES, (ROWS,), generator=g)
    rng = np.random.default_rng(seed)
    opts = [torch.optim.SGD(mod.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=6e-4)
            for mod in (lib, other)]  # fmt: skip
    criterion = lib.make_loss()
    plan = [(True, i) for i in range(m)] + [(False, None), (None, None)]  # None: the preset's own coin
    seen = {"owners": set(), "linear": 0, "cut_cells": 0, "unmixed": 0, "loss": 0.0, "logits": 0.0}
    lib.train()
    other.train()
    for step, (cut, owner) in enumerate(plan):
        progress = min(1.0, offset + 0.01 * step)
        p_cut = ref.cutmix_probability(method["cutmix_prob"], method["ramp"], progress)
        rows = ref.make_rows(rng, rng.choice(ROWS, ROWS // 2, replace=False), m, 2, method["input_repetition"])
        flat = ref.augment_crop_flip(rng, images[torch.from_numpy(rows.reshape(-1))], padding=2)
        x = ((flat.to(dtype) / 255 - 0.5) / 0.25).view(len(rows), m, 3, SIZE, SIZE)
        y = labels[torch.from_numpy(rows)]
        if cut is None:
            mix = ref.draw_mix(rng, len(rows), m, SIZE, SIZE, method["alpha"], p_cut)
        else:
            mix = _draw(rng, len(rows), m, method["alpha"], cut, owner)
        if mix.cutmix:
            seen["owners"].add(mix.owner)
            # a box edge inside a final 4x4-pixel cell: the masks must be brought down by area coverage
            seen["cut_cells"] += int((mix.boxes % (SIZE // 4) != 0).any())
        else:
            seen["linear"] += 1
        info = mix_to_info(mix, dtype)
        lib.set_progress(progress)
        lib.mixer.make_params = lambda enc, progress=0.0, generator=None, info=info: info  # type: ignore[method-assign]
        out = lib(x)
        loss_lib = criterion(out, y)
        strength = min(1.0, progress / method["fadeout_end"]) if method["unmix"] == "fadeout" else 0.0
        masks = mix.masks.to(dtype)
        logits = other.forward_train(x, masks, unmix=method["unmix"], strength=strength, fraction=method["fraction"])
        ce = F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1), reduction="none").view(len(rows), m)
        loss_ref = (ref.loss_weights(mix.ratios.to(dtype), method["root"]) * ce).mean(dim=0).sum()
        if mix.cutmix and method["unmix"] != "none" and strength < 1:
            other.eval()  # (running statistics untouched)
            with torch.no_grad():  # unmixing changes what each member pools: the members' vectors differ
                feats = other.core(m * sum(masks[:, i, None] * other.encoders[i](x[:, i]) for i in range(m)))
                pooled = ref.unmix_pool(feats, masks, method["unmix"], strength, method["fraction"])
                seen["unmixed"] += int(float((pooled[:, 0] - pooled[:, 1]).abs().max()) > 1e-3)
            other.train()
        seen["logits"] = max(seen["logits"], float((out.logits - logits).detach().abs().max()))
        seen["loss"] = max(seen["loss"], abs(float(loss_lib.detach()) - float(loss_ref.detach())))
        for opt, loss in zip(opts, (loss_lib, loss_ref), strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
    lib_p = [*lib.encoder.kernels().unbind(0), *lib.core.parameters(), *lib.heads.weight.unbind(0),
             *lib.heads.bias.unbind(0)]  # fmt: skip
    ref_p = [*(e.weight for e in other.encoders), *other.core.parameters(), *(h.weight for h in other.heads),
             *(h.bias for h in other.heads)]  # fmt: skip
    seen["params"] = max(float((a - b).detach().abs().max()) for a, b in zip(lib_p, ref_p, strict=True))
    seen["buffers"] = max(float((a.double() - b.double()).abs().max())
                          for a, b in zip(lib.core.buffers(), other.core.buffers(), strict=True))  # fmt: skip
    # and the trained pair evaluates alike: summed encodings, one core pass, the mean of member probabilities
    x_eval = torch.randn(6, 3, SIZE, SIZE, generator=g, dtype=dtype)
    lib.eval()
    other.eval()
    with torch.no_grad():
        theirs = other.forward_eval(x_eval)
        seen["eval"] = float((lib(x_eval) - theirs).abs().max())
        seen["predict"] = float((lib.predict(x_eval) - theirs.softmax(dim=2).mean(dim=1)).abs().max())
    return seen


# the progress buffer and the fadeout strength are float32 in the library: differences up to 3e-8 (logits, during
# fadeout), about 1e-15 elsewhere
LOCKSTEP_TOL = 1e-6


@pytest.mark.parametrize("offset", [0.0, 0.2, 0.95])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_lockstep_with_cutmix_and_unmixing(preset, offset):
    """Offsets: the start (full unmixing), fadeout at 60 % strength, inside MixMo's CutMix ramp (fadeout over)."""
    method = ref.PRESETS[preset]
    seen = _lockstep(preset, offset)
    # what the steps exercised (so the comparison cannot go vacuous)
    assert seen["owners"] == {0, 1} and seen["linear"] >= 1
    assert seen["cut_cells"] >= 1
    unmixing = method["unmix"] != "none" and (method["unmix"] != "fadeout" or offset < method["fadeout_end"])
    assert (seen["unmixed"] >= 2) == unmixing, seen
    for key in ("loss", "logits", "params", "buffers", "eval", "predict"):
        assert seen[key] < LOCKSTEP_TOL, (key, seen)


@pytest.mark.parametrize("preset", ["mixmo", "unmix", "mixshare-partial"])
def test_lockstep_with_three_members(preset):
    """M = 3: CutMix(owner, MixUp(the others)), each member owning the box once."""
    seen = _lockstep(preset, 0.0, m=3, seed=1)
    assert seen["owners"] == {0, 1, 2} and seen["cut_cells"] >= 1
    for key in ("loss", "logits", "params", "buffers", "eval", "predict"):
        assert seen[key] < LOCKSTEP_TOL, (key, seen)


# -- 3. the wrapper's own sampler against the reference's -------------------------------------------------------------
N_BATCHES, BATCH = 160, 32


def _beta_var(alpha: float) -> float:
    return 1 / (4 * (2 * alpha + 1))  # Beta(alpha, alpha)


def _check_coin(cuts: int, n: int, p: float, who: str) -> None:
    """The CutMix share of ``n`` batches: exactly 0 / n for p = 0 / 1, else within 4.5 binomial standard errors."""
    if p in (0.0, 1.0):
        assert cuts == round(p * n), (who, cuts, n, p)
    else:
        assert abs(cuts / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (who, cuts, n, p)


def _check_linear_ratios(lam: torch.Tensor, alpha: float, who: str) -> None:
    """λ of the linear mixes: exactly 1/2 for alpha <= 0, else Beta(alpha, alpha).

    Tolerances: the mean within 4.5 standard errors; the variance within 15 % (its relative standard error is
    about sqrt(2 / n), under 4 % for the >= 1500 values used; Beta(1, 1) differs from Beta(2, 2) by 67 %).
    """
    if alpha <= 0:
        assert torch.equal(lam, torch.full_like(lam, 0.5)), who
        return
    var = _beta_var(alpha)
    assert lam.numel() >= 1500, (who, lam.numel())
    assert abs(float(lam.mean()) - 0.5) < 4.5 * math.sqrt(var / lam.numel()), who
    assert abs(float(lam.var()) / var - 1) < 0.15, (who, float(lam.var()), var)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_wrappers_sampler_draws_like_the_reference(preset):
    """The wrapper's own mixer, with its preset's values, against the reference sampler with its table's values."""
    method = ref.PRESETS[preset]
    mixer = _wrapper(preset).mixer
    enc = torch.zeros(BATCH, 2, 1, 32, 32, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    for progress in (0.0, 0.98):  # 0.98: inside MixMo's ramp, the CutMix probability is down to 0.12
        p = ref.cutmix_probability(method["cutmix_prob"], method["ramp"], progress)
        assert float(mixer.current_cutmix_prob(progress)) == pytest.approx(p, abs=1e-6)
        mine = [mixer.make_params(enc, progress, generator=g) for _ in range(N_BATCHES)]
        theirs = [ref.draw_mix(rng, BATCH, 2, 32, 32, method["alpha"], p) for _ in range(N_BATCHES)]
        my_cut = [info for info in mine if bool(info.cutmix)]
        their_cut = [mix for mix in theirs if mix.cutmix]
        _check_coin(len(my_cut), N_BATCHES, p, "library")
        _check_coin(len(their_cut), N_BATCHES, p, "reference")
        # linear mixes: constant masks λ ~ Beta(alpha, alpha) per sample
        my_lin = [info.ratios[:, 0] for info in mine if not bool(info.cutmix)]
        their_lin = [mix.ratios[:, 0] for mix in theirs if not mix.cutmix]
        if len(my_lin) >= 50 and len(their_lin) >= 50:
            _check_linear_ratios(torch.cat(my_lin), method["alpha"], "library")
            _check_linear_ratios(torch.cat(their_lin), method["alpha"], "reference")
        if len(my_cut) < 15:
            continue
        # CutMix: one owner per batch, drawn uniformly; λ is the realised (clipped) share, the mean of each mask
        owners = []
        for info in my_cut:
            owner = info.inside.argmax(dim=1)
            assert torch.equal(owner, owner[:1].expand_as(owner))
            owners.append(int(owner[0]))
            torch.testing.assert_close(info.ratios, info.masks_at().mean(dim=(2, 3)), rtol=0, atol=1e-12)
            torch.testing.assert_close(info.ratios[:, owners[-1]], info.box_area(), rtol=0, atol=1e-12)
        for who, found in (("library", owners), ("reference", [mix.owner for mix in their_cut])):
            n = len(found)
            assert abs(sum(o == 0 for o in found) - n / 2) < 4.5 * math.sqrt(n / 4), (who, found)
        # the owner's realised area: the same distribution (mean within 4.5 standard errors of the difference,
        # quartiles within 0.04; its mean is about 0.31 at 32x32 with Beta(2, 2) because of the clipping)
        a = torch.cat([info.ratios[:, int(info.inside[0].argmax())] for info in my_cut])
        c = torch.cat([mix.ratios[:, mix.owner] for mix in their_cut])
        se = math.sqrt(a.var() / a.numel() + c.var() / c.numel())
        assert abs(float(a.mean() - c.mean())) < 4.5 * se, (float(a.mean()), float(c.mean()))
        qs = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        torch.testing.assert_close(a.quantile(qs), c.quantile(qs), rtol=0, atol=0.04)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_wrapper_mixes_with_scale_m_and_the_masks(preset):
    """Training mixes are ``M sum_i m_i l_i`` (the scale of the test-time sum), for a CutMix and a linear draw."""
    for m in (2, 3):
        model = _wrapper(preset, m).double()
        enc = torch.randn(4, m, 16, 8, 8, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
        own = model.mixer.make_params(enc, 0.0, generator=torch.Generator().manual_seed(3))
        draws = [ref.draw_mix(np.random.default_rng(m), 4, m, 8, 8, 2.0, cut) for cut in (1, 0)]
        drawn = [mix_to_info(d, torch.float64) for d in draws]
        assert bool(drawn[0].cutmix) and not bool(drawn[1].cutmix)
        for info in (own, *drawn):
            expected = m * (info.masks_at()[:, :, None] * enc).sum(dim=1)
            torch.testing.assert_close(model.mixer.apply(enc, info), expected, rtol=1e-12, atol=1e-12)


# -- 4. the wrapper's own batcher against the reference's -------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_wrappers_batcher_builds_rows_like_the_reference(preset):
    """``model.make_batcher(2)`` vs the reference's ``make_rows`` with its table's input repetition.

    Exact: 2B rows, each image exactly twice per member, labels that follow their images, at least
    ``round(input_repetition * 2B)`` rows with one image in every member. In distribution (200 batches of 32 images
    each): the mean number of such rows within 5 standard errors of the difference plus 0.1 (about 2 rows per batch
    by chance without input repetition, since each image appears twice; 6 + about 1.8 with 10 %), and the
    per-member shuffles uncorrelated outside the repeated rows.
    """
    method = ref.PRESETS[preset]
    b, n_batches = 32, 200
    batcher = _wrapper(preset).make_batcher(2, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(5)
    x = torch.arange(b, dtype=torch.float64).view(b, 1, 1, 1).expand(b, 1, 2, 2).contiguous()
    y = (torch.arange(b) * 7) % 10
    shared = round(method["input_repetition"] * 2 * b)
    same_lib, same_ref, corr_lib, corr_ref = [], [], [], []
    for _ in range(n_batches):
        xs, ys = batcher(x, y)
        ids = xs[:, :, 0, 0, 0].long()
        assert ids.shape == (2 * b, 2)
        for i in range(2):
            assert torch.bincount(ids[:, i], minlength=b).tolist() == [2] * b
        assert torch.equal(ys, (ids * 7) % 10)
        rows = torch.from_numpy(ref.make_rows(rng, np.arange(b), 2, 2, method["input_repetition"]))
        for found, same, corr in ((ids, same_lib, corr_lib), (rows, same_ref, corr_ref)):
            same.append(int((found[:, 0] == found[:, 1]).sum()))
            corr.append(float(torch.corrcoef(found.T.double())[0, 1]))
    assert min(same_lib) >= shared and min(same_ref) >= shared
    a, c = torch.tensor(same_lib, dtype=torch.float64), torch.tensor(same_ref, dtype=torch.float64)
    se = math.sqrt(a.var() / n_batches + c.var() / n_batches)
    assert abs(float(a.mean() - c.mean())) < 5 * se + 0.1, (float(a.mean()), float(c.mean()))
    # the row correlation of the members' images: about the input-repetition share (those rows are identical), as
    # independent shuffles give the other rows (measured: -0.01 without input repetition, 0.09-0.11 with 10 %;
    # the standard error of the mean over 200 batches is about 0.01); 1 if the members share one permutation
    for corr in (corr_lib, corr_ref):
        assert abs(sum(corr) / len(corr) - shared / (2 * b)) < 0.06, sum(corr) / len(corr)


def test_batch_repetition_gives_each_copy_its_own_augmentation():
    """Each of the b copies of an image goes through the transform on its own (MixMo repeats before augmenting)."""
    g = torch.Generator().manual_seed(0)
    noise = lambda batch: batch + torch.rand(batch.shape, generator=g, dtype=batch.dtype)  # noqa: E731
    batcher = _wrapper("mixmo").make_batcher(3, transform=noise, generator=torch.Generator().manual_seed(1))
    x = torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    xs, _ = batcher(x, torch.arange(4))
    assert xs.shape == (12, 2, 1, 2, 2)
    for i in range(2):
        values = xs[:, i].reshape(12, -1)
        image = values[:, 0].floor().long()
        for k in range(4):  # three copies per member, three different draws of the transform
            copies = values[image == k]
            assert copies.shape[0] == 3 and len({tuple(r.tolist()) for r in copies}) == 3


def test_augment_inputs_augments_every_member_input_on_its_own_as_the_reference():
    """``make_batcher(..., augment="inputs")``: the reference's augmentation, one draw per (row, member) cell, so the
    input-repetition rows carry one image under M different augmentations; the default shares one per copy."""
    x = torch.arange(16, dtype=torch.float64).view(16, 1, 1, 1).expand(16, 1, 2, 2).contiguous()
    for augment, draws in (("inputs", 32 * 2), ("copies", 32)):
        g = torch.Generator().manual_seed(0)
        noise = lambda batch, g=g: batch + 0.5 * torch.rand(batch.shape, generator=g, dtype=batch.dtype)  # noqa: E731
        batcher = _wrapper("mixshare").make_batcher(2, transform=noise, augment=augment,
                                                    generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert batcher.augment == augment
        xs, ys = batcher(x, torch.arange(16))
        ids = xs[:, :, 0, 0, 0].floor().long()
        assert torch.equal(ys, ids)
        shared = ids[:, 0] == ids[:, 1]
        assert int(shared.sum()) >= 3  # round(0.1 * 32) rows of one image
        assert len({tuple(v.tolist()) for v in xs.reshape(64, -1)}) == draws
        assert bool((xs[shared, 0] != xs[shared, 1]).any(-1).any(-1).any(-1).all()) == (augment == "inputs")


# -- 5. encoders, schedules, loss weights --------------------------------------------------------------------------
def _colinear(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b).abs() / (a.norm() * b.norm())) > 1 - 1e-9


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_encoder_copies_are_aligned_exactly_where_the_reference_aligns_them(preset):
    method = ref.PRESETS[preset]
    for m in (2, 3):
        kernels = _wrapper(preset, m, seed=m).encoder.kernels().detach()
        torch.manual_seed(m)
        theirs = [e.weight.detach() for e in ref.ReferenceMIMO(5, m, 10, 1, method["encoder_init"]).encoders]
        for i in range(1, m):
            aligned_ref = torch.equal(theirs[0], theirs[i])
            assert aligned_ref == (method["encoder_init"] == "aligned")
            if aligned_ref:
                assert torch.equal(kernels[0], kernels[i]), (preset, i)
            else:  # independent draws: not even colinear
                assert not _colinear(kernels[0], kernels[i]), (preset, i)


def test_colinear_encoders_are_scalar_multiples_of_one_kernel():
    kernels = _wrapper("mixshare", 3, encoder_init="colinear").encoder.kernels().detach()
    scales = [float(kernels[i].flatten() @ kernels[0].flatten() / kernels[0].norm() ** 2) for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(kernels[i], scales[i] * kernels[0])
    assert len({round(s, 9) for s in scales}) == 3


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_the_fadeout_schedule_is_the_references(preset):
    """Strength ``r = min(1, progress / fadeout_end)`` in fadeout mode (masks ``m + r (1 - m)``), 0 otherwise."""
    method = ref.PRESETS[preset]
    unmixer = _wrapper(preset).unmixer
    for progress in np.linspace(0, 1, 25).tolist():
        expected = min(1.0, progress / method["fadeout_end"]) if method["unmix"] == "fadeout" else 0.0
        assert float(unmixer.strength(progress)) == pytest.approx(expected, abs=1e-6), progress
    if method["unmix"] == "fadeout":  # full unmixing at the start, none from fadeout_end on
        assert float(unmixer.strength(0.0)) == 0.0 and float(unmixer.strength(method["fadeout_end"])) == 1.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_loss_weights_follow_the_reference_root(preset):
    """``w_k = M λ_k^(1/r) / sum_j λ_j^(1/r)`` from the preset's r (1 each without one), on unequal ratios."""
    method = ref.PRESETS[preset]
    for m in (2, 3):
        model = _wrapper(preset, m).double()
        info = mix_to_info(ref.draw_mix(np.random.default_rng(m), 6, m, 32, 32, 2.0, 1.0), torch.float64)
        lam = info.ratios
        assert float((lam.max(dim=1).values - lam.min(dim=1).values).min()) > 0.01  # unequal shares in every row
        model.mixer.make_params = lambda enc, progress=0.0, generator=None, info=info: info  # type: ignore[method-assign]
        weights = model(torch.randn(6, m, 3, 32, 32, dtype=torch.float64)).mix_info.loss_weights
        root = method["root"]
        hand = torch.ones_like(lam) if root is None else m * lam ** (1 / root) / (lam ** (1 / root)).sum(1, True)
        torch.testing.assert_close(weights, hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weights, ref.loss_weights(lam, root), rtol=1e-12, atol=1e-12)


# -- 6. eval, folding, heads ---------------------------------------------------------------------------------------
@torch.no_grad()
def _perturbed(preset: str, m: int) -> MIMOWrapper:
    """A float64 wrapper with every parameter and BatchNorm statistic moved off its initial value (biases too)."""
    model = _wrapper(preset, m).double()
    g = torch.Generator().manual_seed(m)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g, dtype=torch.float64))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model.eval()


@pytest.mark.parametrize("preset", ["mimo", "mixmo", "mixshare"])
@pytest.mark.parametrize("m", [2, 3])
def test_eval_sums_the_encodings_and_fold_equals_eval(preset, m):
    """Test time: the same image through every encoder, encodings *summed*, one core pass, shared pooled vector.

    The hand computation uses per-member convolutions (not the library's summed kernel); the heads' biases are
    non-zero, so a fold that drops them shows.
    """
    model = _perturbed(preset, m)
    assert float(model.heads.bias.detach().abs().min()) > 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        kernels = model.encoder.kernels()
        summed = sum(F.conv2d(x, kernels[i], None, 1, 1) for i in range(m))
        pooled = model.core(summed).mean(dim=(2, 3))
        hand = torch.stack([pooled @ model.heads.weight[i].T + model.heads.bias[i] for i in range(m)], dim=1)
        torch.testing.assert_close(model(x), hand, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x[:, None].expand(-1, m, -1, -1, -1)), hand, rtol=1e-12, atol=1e-12)
        folded = fold(model)
        torch.testing.assert_close(folded(x), hand, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(folded.encoder.weight, kernels.sum(dim=0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(folded.head.bias, model.heads.bias.reshape(-1), rtol=0, atol=0)


def test_the_ensemble_rules():
    """``"prob"`` (default): the mean of the members' probabilities (the reference's evaluation); ``"logit"``:
    the softmax of the mean logits (MixMo's code)."""
    model = _perturbed("mixmo", 3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    assert float((logits[:, 0] - logits[:, 1]).abs().max()) > 0.1  # members that disagree: the rules differ
    torch.testing.assert_close(model.predict(x), logits.softmax(dim=2).mean(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.predict(x, rule="logit"), logits.mean(dim=1).softmax(dim=1), rtol=1e-12,
                               atol=1e-12)  # fmt: skip


def _spread(values: list[torch.Tensor]) -> float:
    return float(torch.stack([v.double().std() for v in values]).mean())


def test_heads_are_independent_draws_of_the_splits_reinit():
    """Without pretrained weights every head is one draw of the split's initialiser (not ``nn.Linear``'s default).

    Checked on the library's WRN (its ``mimo_split().reinit``) and on a split with a distinctive initialiser
    (normal, std 0.5, bias 0.25): weight spread within 10 % of the initialiser's own over 6 seeds, biases as it
    sets them, and the M heads different draws.
    """
    lib_w, own_w, lib_b, own_b = [], [], [], []
    for seed in range(6):
        model = _wrapper("mixmo", 3, seed=seed, num_classes=40)
        split = wide_resnet(10, 1, num_classes=40).mimo_split()
        for i in range(3):
            lib_w.append(model.heads.weight[i].detach())
            lib_b.append(model.heads.bias[i].detach())
            head = nn.Linear(64, 40)
            split.reinit(head)
            own_w.append(head.weight.detach())
            own_b.append(head.bias.detach())
        assert not torch.equal(model.heads.weight[0], model.heads.weight[1])
    assert abs(_spread(lib_w) / _spread(own_w) - 1) < 0.1, (_spread(lib_w), _spread(own_w))
    assert torch.equal(torch.stack(lib_b).abs().amax() == 0, torch.stack(own_b).abs().amax() == 0)
    if float(torch.stack(own_b).abs().amax()) > 0:
        assert abs(_spread(lib_b) / _spread(own_b) - 1) < 0.1

    def distinctive(module: nn.Module) -> None:
        for sub in module.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(sub.weight, 0.0, 0.5)
                if sub.bias is not None:
                    nn.init.constant_(sub.bias, 0.25)

    torch.manual_seed(0)
    split = BackboneSplit(
        encoder=nn.Conv2d(3, 8, 3, padding=1), core=nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU()),
        classifier=nn.Linear(64, 40), reinit=distinctive,
    )  # fmt: skip
    heads = MIMOWrapper(None, 3, "mixmo", split=split).heads
    assert abs(float(heads.weight.detach().std()) / 0.5 - 1) < 0.1
    assert torch.equal(heads.bias.detach(), torch.full((3, 40), 0.25))
    assert not torch.equal(heads.weight[0], heads.weight[1])
