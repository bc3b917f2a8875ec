"""Property-based tests (hypothesis): a bounded randomised search over shapes, dtypes and presets.

Searched space: B 1..5, M 1..4, C 1..8, H and W 1..40, float32 and float64, every preset. Checked:

* the masked ops against float64 references written here from the definitions (exact area coverage computed with
  fractions, masks, mixing, masked pooling), independent of the library's own code paths;
* the wrapper's invariants: masks and ratios sum to 1, loss weights to M, the train forward is the composition of
  its parts, eval logits equal ``fold()``'s for every member, the eval mixer is the identity (plain sum);
* bad inputs answered by the library's own ``TypeError`` / ``ValueError`` (naming the argument), never a deep
  torch error.

CI runs a fixed, derandomised set of examples (a few seconds per test). For a wider search:
``MIXSHARE_HYPOTHESIS_EXAMPLES=2000 MIXSHARE_HYPOTHESIS_RANDOM=1 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mixshare_layers import PRESETS, BackboneSplit, CutMixMixer, MIMOLoss, MIMOWrapper, MixInfo
from mixshare_layers.functional import mix, sample_mix_params, unmix_pool

EXAMPLES = int(os.environ.get("MIXSHARE_HYPOTHESIS_EXAMPLES", "40"))
SEARCH = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("MIXSHARE_HYPOTHESIS_RANDOM", "0") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_PRESET = settings(SEARCH, max_examples=max(1, EXAMPLES // 3))  # for tests run once per preset

batch = st.integers(1, 5)
members = st.integers(1, 4)
channels = st.integers(1, 8)
side = st.integers(1, 40)
dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**31 - 1)
presets = st.sampled_from(sorted(PRESETS))  # (the wrapper's invariants run for every preset: parametrized)
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


# -- float64 references, from the definitions ----------------------------------------------------------------------
def _coverage(lo: int, hi: int, native: int, target: int) -> list[float]:
    """Share of each of ``target`` equal cells of [0, native) covered by [lo, hi), in exact rational arithmetic."""
    cell = Fraction(native, target)
    out = []
    for j in range(target):
        a, b = j * cell, (j + 1) * cell
        overlap = max(Fraction(0), min(b, Fraction(hi)) - max(a, Fraction(lo)))
        out.append(float(overlap / cell))
    return out


def _masks(info: MixInfo, h: int, w: int, strength: float = 0.0) -> torch.Tensor:
    """``(B, M, h, w)`` float64 masks ``cov * inside + (1 - cov) * outside``, faded by ``strength``."""
    b, m = info.inside.shape
    out = torch.empty(b, m, h, w, dtype=torch.float64)
    for r in range(b):
        y0, y1, x0, x1 = (int(v) for v in info.boxes[r])
        cov = torch.outer(
            torch.tensor(_coverage(y0, y1, info.height, h), dtype=torch.float64),
            torch.tensor(_coverage(x0, x1, info.width, w), dtype=torch.float64),
        )
        for i in range(m):
            mask = cov * float(info.inside[r, i]) + (1 - cov) * float(info.outside[r, i])
            out[r, i] = mask + strength * (1 - mask)
    return out


def _draw(b: int, m: int, h: int, w: int, seed: int, cutmix: float, alpha: float, dtype=torch.float64) -> MixInfo:
    g = torch.Generator().manual_seed(seed)
    return sample_mix_params(b, m, h, w, alpha=alpha, cutmix_prob=cutmix, dtype=dtype, generator=g)


mix_draws = st.tuples(
    batch, members, side, side, seeds, st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 2.0])
)


# -- masked ops ----------------------------------------------------------------------------------------------------
@SEARCH
@given(draw=mix_draws, h=side, w=side)
def test_masks_follow_the_exact_coverage_definition(draw, h, w):
    b, m, height, width, seed, cutmix, alpha = draw
    info = _draw(b, m, height, width, seed, cutmix, alpha)
    expected = _masks(info, h, w)
    got = info.masks_at(h, w, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(b, h, w, dtype=torch.float64))  # a partition of unity
    torch.testing.assert_close(got.mean(dim=(2, 3)), info.ratios)  # λ = the mean, at any resolution
    torch.testing.assert_close(info.ratios.sum(dim=1), torch.ones(b, dtype=torch.float64))
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0 + 1e-12
    if m > 1 and cutmix == 1.0:  # CutMix: one owner for the batch, one-hot inside
        assert bool(info.cutmix)
        assert torch.equal(info.inside.argmax(1), info.inside.argmax(1)[:1].expand(b))


@SEARCH
@given(draw=mix_draws, c=channels, dtype=dtypes, scale=st.sampled_from([None, 1.0, 2.5]))
def test_mix_matches_the_float64_definition(draw, c, dtype, scale):
    b, m, h, w, seed, cutmix, alpha = draw
    info = _draw(b, m, h, w, seed, cutmix, alpha, dtype=dtype)
    e = torch.randn(b, m, c, h, w, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    k = float(m) if scale is None else scale
    expected = k * (_masks(info, h, w)[:, :, None] * e.double()).sum(dim=1)
    got = mix(e, info, scale)
    assert got.dtype == dtype and got.shape == (b, c, h, w)
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])


@SEARCH
@given(
    draw=mix_draws,
    c=channels,
    fh=side,
    fw=side,
    dtype=dtypes,
    strength=st.sampled_from([0.0, 0.25, 1.0]),
    partial=st.booleans(),
    normalize=st.booleans(),
    data=st.data(),
)
def test_unmix_pool_matches_the_float64_definition(draw, c, fh, fw, dtype, strength, partial, normalize, data):
    b, m, h, w, seed, cutmix, alpha = draw
    info = _draw(b, m, h, w, seed, cutmix, alpha)
    k = data.draw(st.integers(0, c)) if partial else None
    f = torch.randn(b, c, fh, fw, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype)
    masks = _masks(info, fh, fw, strength)[:, :, None].expand(-1, -1, c, -1, -1).clone()  # (B, M, C, h, w)
    if k is not None:
        masks[:, :, k:] = 1.0  # the channels past the first k are not unmixed
    total = (masks * f.double()[:, None]).sum(dim=(-2, -1))
    if normalize:
        mass = masks.sum(dim=(-2, -1))
        expected = torch.where(mass > 0, total / mass.clamp_min(1e-300), torch.zeros_like(total))
    else:
        expected = total / (fh * fw)
    got = unmix_pool(f, info, strength=strength, num_unmixed=k, normalize=normalize)
    assert got.dtype == dtype and got.shape == (b, m, c)
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])


# -- the wrapper ---------------------------------------------------------------------------------------------------
def _split(c: int, k: int, dtype: torch.dtype) -> BackboneSplit:
    """A small CNN without batch statistics (any B and map size, even 1 x 1, trains)."""
    encoder = nn.Conv2d(c, 6, 3, padding=1)
    core = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 7, 3, stride=2, padding=1), nn.GroupNorm(1, 7), nn.ReLU())
    split = BackboneSplit(encoder=encoder, core=core, classifier=nn.Linear(7, k))
    for part in split[:3]:
        part.to(dtype)
    return split


wrapped = st.tuples(batch, members, channels, side, side, dtypes, seeds)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@PER_PRESET
@given(case=wrapped, progress=st.floats(0.0, 1.0))
def test_wrapper_train_eval_and_fold_invariants(preset, case, progress):
    b, m, c, h, w, dtype, seed = case
    torch.manual_seed(seed)
    model = MIMOWrapper(num_subnetworks=m, preset=preset, split=_split(c, 4, dtype))
    model.set_progress(progress)
    x = torch.randn(b, m, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 1 x 1 final maps warn that unmixing is a no-op there
        out = model(x, generator=torch.Generator().manual_seed(seed))
        logits, info = out
        assert logits.shape == (b, m, 4) and logits.dtype == dtype and bool(torch.isfinite(logits).all())
        torch.testing.assert_close(info.masks_at().sum(dim=1), torch.ones(b, h, w, dtype=info.ratios.dtype))
        torch.testing.assert_close(info.ratios.sum(dim=1), torch.ones(b, dtype=info.ratios.dtype))
        torch.testing.assert_close(info.loss_weights.sum(dim=1), torch.full((b,), float(m), dtype=info.ratios.dtype))
        # the train forward is the composition of the parts, replaying the same mix
        encodings = model.encoder(x)
        features = model.core(model.mixer.apply(encodings, info))
        replay = model.heads(model.unmixer(features, info, model.progress))
        torch.testing.assert_close(logits, replay, **TOL[dtype])
        y = torch.randint(4, (b, m), generator=torch.Generator().manual_seed(seed))
        loss = MIMOLoss()(out, y)
        assert bool(torch.isfinite(loss)) and float(loss) >= 0.0

        model.eval()
        x1 = x[:, 0]
        eval_logits = model(x1)
        folded = model.fold()(x1)
        torch.testing.assert_close(eval_logits, folded, **TOL[dtype])  # every member equals fold()'s
        same = model(x1[:, None].expand(-1, m, -1, -1, -1))  # the same image in every slot: the same logits
        torch.testing.assert_close(same, eval_logits, **TOL[dtype])
        mixed, identity = model.mixer(encodings)  # eval mixing: identity masks, the plain sum
        assert torch.equal(identity.masks_at(), torch.ones(b, m, h, w))
        torch.testing.assert_close(mixed, encodings.sum(dim=1), rtol=0, atol=0)
        assert model.predict(x1).shape == (b, 4)


@SEARCH
@given(m=members, b=batch, c=channels, h=side, w=side, seed=seeds)
def test_eval_mixer_and_identity_info_are_exact(m, b, c, h, w, seed):
    e = torch.randn(b, m, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mixer = CutMixMixer(m).eval()
    mixed, info = mixer(e)
    torch.testing.assert_close(mixed, e.sum(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(mix(e, info, 1.0), e.sum(dim=1))
    torch.testing.assert_close(unmix_pool(e[:, 0], info), e[:, 0].mean(dim=(2, 3))[:, None].expand(-1, m, -1))


# -- bad inputs ----------------------------------------------------------------------------------------------------
def _bad_image(x: torch.Tensor, kind: str, c: int) -> object:
    if kind == "channels":
        return torch.randn(*x.shape[:-3], c + 1, *x.shape[-2:])
    if kind == "uint8":
        return x.to(torch.uint8)
    if kind == "int64":
        return x.long()
    if kind == "float64":
        return x.double()
    if kind == "meta":
        return x.to("meta")
    if kind == "list":
        return list(x.unbind(1)) if x.dim() == 5 else list(x.unbind(0))
    if kind == "rank":
        return x.flatten(0, 1) if x.dim() == 5 else x[0]
    raise AssertionError(kind)


@SEARCH
@given(
    case=st.tuples(presets, batch, st.integers(2, 4), channels, st.integers(1, 12), st.integers(1, 12), seeds),
    kind=st.sampled_from(["channels", "uint8", "int64", "float64", "meta", "list", "rank"]),
    mode=st.sampled_from(["train", "eval", "predict"]),
)
def test_bad_images_get_the_librarys_own_errors(case, kind, mode):
    preset, b, m, c, h, w, seed = case
    model = MIMOWrapper(num_subnetworks=m, preset=preset, split=_split(c, 3, torch.float32))
    x = torch.randn(b, m, c, h, w, generator=torch.Generator().manual_seed(seed))
    if mode != "train":
        model.eval()
        x = x[:, 0]
    call = model.predict if mode == "predict" else model
    with pytest.raises((TypeError, ValueError)) as err:
        call(_bad_image(x, kind, c))
    assert type(err.value) in (TypeError, ValueError)  # not a subclass raised from inside torch
    assert str(err.value).startswith("x "), str(err.value)


@SEARCH
@given(
    b=batch,
    m=members,
    k=st.integers(1, 6),
    seed=seeds,
    low=st.integers(-3, 0),
    high=st.integers(0, 3),
    float_targets=st.booleans(),
)
def test_bad_targets_get_the_librarys_own_errors(b, m, k, seed, low, high, float_targets):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, m, k, generator=g, dtype=torch.float64)
    targets = torch.randint(low, k + high, (b, m), generator=g)
    bad = bool(((targets < 0) | (targets >= k)).any())
    if float_targets:
        with pytest.raises(TypeError, match=r"^targets must hold integer class indices"):
            MIMOLoss(None)(logits, targets.double())
    elif bad:
        with pytest.raises(ValueError, match=rf"^targets must hold class indices in \[0, {k}\)"):
            MIMOLoss(None)(logits, targets)
    else:
        loss = MIMOLoss(None)(logits, targets)
        expected = sum(
            torch.nn.functional.cross_entropy(logits[:, i], targets[:, i], reduction="mean") for i in range(m)
        )
        torch.testing.assert_close(loss, expected)
