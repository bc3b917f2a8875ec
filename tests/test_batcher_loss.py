"""MIMOBatcher (repetition, shuffles, input repetition), loss weights, MIMOLoss and the ensemble helpers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from mixshare_layers import MIMOBatcher, MIMOLoss, MixInfo
from mixshare_layers.functional import (
    ensemble_log_probs,
    ensemble_probs,
    from_estimator_major,
    mimo_cross_entropy,
    rebalanced_weights,
    sample_mix_params,
    to_estimator_major,
)


def _ids(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels hold their own index, and labels that are a known function of it."""
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, 3, 3).contiguous()
    return x, (torch.arange(b) * 7) % 10


def _row_ids(xs: torch.Tensor) -> torch.Tensor:
    return xs[:, :, 0, 0, 0].long()  # (N, M) image index in every slot


# -- batcher ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("rep", [1, 2, 4])
def test_every_image_appears_b_times_per_subnetwork(m, b, rep):
    x, y = _ids(b)
    xs, ys = MIMOBatcher(m, rep, generator=torch.Generator().manual_seed(m))(x, y)
    assert xs.shape == (b * rep, m, 2, 3, 3) and ys.shape == (b * rep, m)
    ids = _row_ids(xs)
    for i in range(m):
        assert torch.bincount(ids[:, i], minlength=b).tolist() == [rep] * b
    assert torch.equal(ys, (ids * 7) % 10)  # labels follow their images


def test_rows_differ_across_subnetworks_without_input_repetition():
    x, y = _ids(64)
    ids = _row_ids(MIMOBatcher(2, 1, 0.0, generator=torch.Generator().manual_seed(0))(x, y)[0])
    # independent permutations: a row repeats its image only by chance (expected 1 row of 64)
    assert int((ids[:, 0] == ids[:, 1]).sum()) <= 4
    ids4 = _row_ids(MIMOBatcher(4, 2, 0.0, generator=torch.Generator().manual_seed(0))(x, y)[0])
    assert int((ids4 == ids4[:, :1]).all(1).sum()) == 0
    # the subnetworks get different permutations
    assert not torch.equal(ids4[:, 0], ids4[:, 1])


@pytest.mark.parametrize("m", [2, 3])
def test_full_input_repetition_gives_equal_rows(m):
    x, y = _ids(10)
    xs, ys = MIMOBatcher(m, 2, 1.0)(x, y)
    ids = _row_ids(xs)
    assert torch.equal(ids, ids[:, :1].expand(-1, m))
    assert torch.equal(ys, ys[:, :1].expand(-1, m))
    assert torch.bincount(ids[:, 0], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("b,rep,expected", [(40, 1, 4), (32, 2, 6), (5, 1, 0), (25, 2, 5)])
def test_count_of_repeated_rows(b, rep, expected):
    # M = 4: rows equal by chance are vanishingly rare, so the count is exactly round(0.1 * B * b)
    x, y = _ids(b)
    ids = _row_ids(MIMOBatcher(4, rep, 0.1, generator=torch.Generator().manual_seed(1))(x, y)[0])
    assert expected == round(0.1 * b * rep)
    assert int((ids == ids[:, :1]).all(1).sum()) == expected
    for i in range(4):  # still every image b times per subnetwork
        assert torch.bincount(ids[:, i], minlength=b).tolist() == [rep] * b


def test_batcher_generator_transform_and_empty_batch():
    x, y = _ids(6)
    a = MIMOBatcher(3, 2, 0.5, generator=torch.Generator().manual_seed(3))(x, y)
    b = MIMOBatcher(3, 2, 0.5, generator=torch.Generator().manual_seed(3))(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seen = []

    def transform(batch):
        seen.append(batch.shape)
        return batch + 100.0

    xs, _ = MIMOBatcher(2, 3, transform=transform)(x, y)
    assert seen == [torch.Size([18, 2, 3, 3])]  # the whole repeated batch, once, before the shuffles
    assert float(xs.min()) >= 100.0
    xs, ys = MIMOBatcher(2, 2)(x[:0], y[:0])
    assert xs.shape == (0, 2, 2, 3, 3) and ys.shape == (0, 2)
    assert repr(MIMOBatcher(2, 2, 0.1)) == "MIMOBatcher(num_subnetworks=2, batch_repetition=2, input_repetition=0.1)"


def _tagging(g: torch.Generator):
    """A transform that adds one random offset per image in [0, 0.5): every call's draws are told apart."""
    return lambda batch: batch + 0.5 * torch.rand(batch.shape[0], 1, 1, 1, generator=g, dtype=batch.dtype)


@pytest.mark.parametrize("augment", ["copies", "inputs"])
def test_where_the_transform_runs(augment):
    b, rep, m = 6, 2, 3
    x, y = _ids(b)
    seen = []

    def transform(batch):
        seen.append(batch.shape)
        return _tagging(g)(batch)

    g = torch.Generator().manual_seed(0)
    batcher = MIMOBatcher(m, rep, 0.5, transform=transform, augment=augment, generator=torch.Generator().manual_seed(1))
    xs, ys = batcher(x, y)
    assert seen == [torch.Size([b * rep * (m if augment == "inputs" else 1), 2, 3, 3])]  # one call per batch
    assert xs.shape == (b * rep, m, 2, 3, 3)
    ids = _row_ids(xs.floor())
    for i in range(m):  # each member still sees each image b times, with the labels of its images
        assert torch.bincount(ids[:, i], minlength=b).tolist() == [rep] * b
    assert torch.equal(ys, (ids * 7) % 10)
    tags = xs[:, :, 0, 0, 0] - ids  # the offset each input got, (B * b, M)
    shared = (ids == ids[:, :1]).all(1)
    assert int(shared.sum()) >= round(0.5 * b * rep)
    if augment == "copies":
        # a row of one image carries one augmented copy; each member's b copies of an image are b distinct draws,
        # and the members draw from the same b * B augmented copies
        assert torch.equal(xs[shared], xs[shared][:, :1].expand_as(xs[shared]))
        assert len(set(tags.flatten().tolist())) == b * rep
        for i in range(1, m):
            assert sorted(tags[:, i].tolist()) == sorted(tags[:, 0].tolist())
    else:  # every input its own draw, the rows of one image included
        assert len(set(tags.flatten().tolist())) == b * rep * m
        assert all(len(set(r.tolist())) == m for r in tags[shared])


def test_the_default_augments_copies_with_the_same_draws_as_before():
    """``augment="copies"`` (the default) transforms the repeated batch first, then draws the rows."""
    x, y = _ids(5)
    g = torch.Generator().manual_seed(4)
    xs, ys = MIMOBatcher(2, 3, 0.2, transform=_tagging(g), generator=g)(x, y)
    g2 = torch.Generator().manual_seed(4)
    repeated = _tagging(g2)(x[torch.arange(5).repeat(3)])
    idx = MIMOBatcher(2, 3, 0.2, generator=g2).indices(5)
    assert torch.equal(xs, repeated[idx]) and torch.equal(ys, y.repeat(3)[idx])
    assert MIMOBatcher(2).augment == "copies"
    assert repr(MIMOBatcher(2, 2, 0.1, augment="inputs")).endswith("input_repetition=0.1, augment='inputs')")


def test_batcher_errors():
    with pytest.raises(ValueError, match="num_subnetworks must be an integer >= 1, but got 0"):
        MIMOBatcher(0)
    with pytest.raises(ValueError, match="batch_repetition must be an integer >= 1, but got 0"):
        MIMOBatcher(2, 0)
    with pytest.raises(ValueError, match=r"input_repetition must be in \[0, 1\], but got 1.5"):
        MIMOBatcher(2, 1, 1.5)
    with pytest.raises(TypeError, match="transform must be callable, but got int"):
        MIMOBatcher(2, transform=3)
    with pytest.raises(ValueError, match="augment must be one of 'copies', 'inputs', but got 'members'"):
        MIMOBatcher(2, augment="members")
    x, y = _ids(4)
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(4,\) to match x, but got \(3,\)"):
        MIMOBatcher(2)(x, y[:3])
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\), but got a tensor of shape \(4, 18\)"):
        MIMOBatcher(2)(x.flatten(1), y)


# -- loss weights ----------------------------------------------------------------------------------------------------
def _ratios(b: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m)
    return sample_mix_params(b, m, 16, 16, cutmix_prob=1.0, dtype=torch.float64, generator=g).ratios


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("r", [None, 1.0, 3.0, 0.5])
def test_rebalanced_weights(m, r):
    lam = _ratios(7, m)
    w = rebalanced_weights(lam, r)
    assert w.shape == (7, m)
    torch.testing.assert_close(w.sum(1), torch.full((7,), float(m), dtype=torch.float64))  # they sum to M
    if r is None:
        assert torch.equal(w, torch.ones(7, m, dtype=torch.float64))
    else:  # MixMo's formula, by hand in float64
        powered = [[float(lam[b, k]) ** (1 / r) for k in range(m)] for b in range(7)]
        expected = torch.tensor([[m * p / sum(row) for p in row] for row in powered], dtype=torch.float64)
        torch.testing.assert_close(w, expected)
    if r == 1.0:
        torch.testing.assert_close(w, m * lam)
    if r == 3.0 and m == 2:  # the larger share gets the larger weight, but flatter than M λ
        big = lam.argmax(1)
        rows = torch.arange(7)
        assert bool((w[rows, big] >= 1).all()) and bool((w[rows, big] <= m * lam[rows, big] + 1e-12).all())


def test_rebalanced_weights_of_an_all_zero_row_are_uniform():
    w = rebalanced_weights(torch.zeros(2, 3), 3.0)
    assert torch.equal(w, torch.ones(2, 3))


# -- MIMOLoss --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [None, 1.0, 3.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mimo_loss_equals_a_hand_loop(r, smoothing):
    b, m, k = 5, 3, 4
    logits = torch.randn(b, m, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.randint(k, (b, m), generator=torch.Generator().manual_seed(1))
    info = sample_mix_params(b, m, 8, 8, cutmix_prob=1.0, dtype=torch.float64, generator=torch.Generator())
    loss = MIMOLoss(r, label_smoothing=smoothing)(logits, targets, info)
    w = rebalanced_weights(info.ratios, r)
    expected = 0.0
    for i in range(m):  # sum over subnetworks of the batch mean of the weighted cross-entropies
        total = 0.0
        for s in range(b):
            ce = F.cross_entropy(logits[s, i][None], targets[s, i][None], label_smoothing=smoothing)
            total += float(w[s, i]) * float(ce)
        expected += total / b
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_mimo_loss_reads_the_output_and_its_mix_info():
    from mixshare_layers import MIMOOutput

    logits = torch.randn(4, 2, 3)
    targets = torch.randint(3, (4, 2))
    info = sample_mix_params(4, 2, 8, 8, cutmix_prob=1.0)
    loss = MIMOLoss(1.0)
    torch.testing.assert_close(loss(MIMOOutput(logits, info), targets), loss(logits, targets, info))
    # without a MixInfo (or with r = None) every weight is 1
    plain = mimo_cross_entropy(logits, targets)
    torch.testing.assert_close(loss(logits, targets), plain)
    torch.testing.assert_close(MIMOLoss(None)(MIMOOutput(logits, info), targets), plain)
    # the identity info (every λ = 1) with r = 1 gives weights M / M = 1 too
    torch.testing.assert_close(loss(logits, targets, MixInfo.identity(4, 2, 8, 8)), plain)
    assert float(mimo_cross_entropy(logits[:0], targets[:0])) == 0.0
    assert repr(loss) == "MIMOLoss(rebalance_root=1.0, label_smoothing=0)"


def test_mimo_loss_gradients_flow_to_logits():
    logits = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(4, (3, 2))
    info = sample_mix_params(3, 2, 8, 8, cutmix_prob=1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: mimo_cross_entropy(z, targets, rebalanced_weights(info.ratios, 3.0)), (logits,)
    )


def test_loss_errors_and_round_trips():
    with pytest.raises(ValueError, match=r"rebalance_root must be in \(0, inf\], but got 0"):
        MIMOLoss(0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], but got 2"):
        MIMOLoss(None, label_smoothing=2.0)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, M\) = \(4, 2\), but got \(4,\)"):
        MIMOLoss()(torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, M, K\)"):
        MIMOLoss()(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights must have shape \(B, M\) = \(4, 2\), but got \(4, 3\)"):
        mimo_cross_entropy(torch.randn(4, 2, 3), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 3))
    with pytest.raises(TypeError, match="output must be a MIMOOutput or a"):
        MIMOLoss()([1.0], torch.zeros(4, 2, dtype=torch.long))
    loss = MIMOLoss(3.0, label_smoothing=0.1)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert repr(clone) == repr(loss)


# -- ensemble helpers ------------------------------------------------------------------------------------------------
def test_ensemble_rules_and_estimator_major_layout():
    logits = torch.randn(5, 3, 4, dtype=torch.float64)
    probs = ensemble_probs(logits)
    torch.testing.assert_close(probs, logits.softmax(-1).mean(1))
    torch.testing.assert_close(ensemble_probs(logits, "logit"), logits.mean(1).softmax(-1))
    torch.testing.assert_close(ensemble_log_probs(logits), probs.log())
    flat = to_estimator_major(logits)
    torch.testing.assert_close(flat, torch.cat([logits[:, i] for i in range(3)]))
    torch.testing.assert_close(from_estimator_major(flat, 3), logits)
    with pytest.raises(ValueError, match="logits has 15 rows, which is not a multiple of num_subnetworks=4"):
        from_estimator_major(flat, 4)
    with pytest.raises(ValueError, match=r"rule must be one of 'prob', 'logit', but got 'max'"):
        ensemble_probs(logits, "max")
