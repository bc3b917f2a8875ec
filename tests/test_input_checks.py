"""Bad input to every public entry point gets a TypeError / ValueError naming the argument, the value and what was
expected; NumPy scalars and 0-dim tensors are accepted where a number is; the value-check
switch; ignore_index."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mixshare_layers import (
    BackboneSplit,
    CutMixMixer,
    MIMOBatcher,
    MIMOConfig,
    MIMOLoss,
    MIMOWrapper,
    MixInfo,
    MultiEncoder,
    MultiHead,
    Unmixer,
    get_value_checks,
    set_value_checks,
)
from mixshare_layers._checks import check_bool, check_int, check_real, values_checked
from mixshare_layers.functional import mimo_cross_entropy, mix, sample_mix_params, unmix_pool


def tiny_split(in_channels: int = 3, num_classes: int = 5) -> BackboneSplit:
    encoder = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
    core = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
    return BackboneSplit(encoder=encoder, core=core, classifier=nn.Linear(12, num_classes))


def tiny_model(m: int = 2, preset: str = "mixshare", **kw) -> MIMOWrapper:
    return MIMOWrapper(num_subnetworks=m, preset=preset, split=tiny_split(), **kw)


def _x(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.fixture(autouse=True)
def _value_checks_restored():
    mode = get_value_checks()
    yield
    set_value_checks(mode)


# -- images --------------------------------------------------------------------------------------------------------
TRAIN = _x(2, 2, 3, 8, 8)
EVAL = _x(2, 3, 8, 8)
IMAGE_CASES = [
    (
        "wrong channels",
        lambda x: x[..., :1, :, :],
        ValueError,
        r"x has 1 channels \(dim -?\d+ of shape .*\) but the encoder expects 3",
    ),
    (
        "uint8",
        lambda x: (x * 50).to(torch.uint8),
        TypeError,
        r"x must be a floating-point image tensor, but got dtype torch.uint8; .*x.float\(\) / 255",
    ),
    ("int64", lambda x: x.long(), TypeError, r"x must be a floating-point image tensor, but got dtype torch.int64"),
    (
        "float64 into float32",
        lambda x: x.double(),
        TypeError,
        r"x has dtype torch.float64 but the parameters of the encoder are torch.float32; .*x.to\(torch.float32\)",
    ),
    (
        "float16 into float32",
        lambda x: x.half(),
        TypeError,
        r"x has dtype torch.float16 but the parameters of the encoder are torch.float32",
    ),
    ("another device", lambda x: x.to("meta"), ValueError, r"x is on device meta, not on cpu like the encoder"),
    (
        "empty spatial size",
        lambda x: x[..., :0],
        ValueError,
        r"x must have a non-empty spatial size H x W, but got shape",
    ),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-M", "predict", "encoder-train", "encoder-eval"])
def test_bad_images(case, mode):
    _, bad, error, match = case
    model = tiny_model(2)
    if mode == "train":
        call, x = model, TRAIN
    elif mode == "eval":
        call, x = model.eval(), EVAL
    elif mode == "eval-M":
        call, x = model.eval(), TRAIN
    elif mode == "predict":
        call, x = model.predict, EVAL
    elif mode == "encoder-train":
        call, x = model.encoder, TRAIN
    else:
        call, x = model.encoder, EVAL
    with pytest.raises(error, match=match):
        call(bad(x))


@pytest.mark.parametrize("mode", ["train", "eval", "predict"])
def test_a_list_instead_of_a_tensor(mode):
    model = tiny_model(2)
    if mode == "train":
        with pytest.raises(
            TypeError,
            match=r"x must be a torch.Tensor of shape \(B, M, C, H, W\), but got a list of 2 tensors; stack them into "
            r"one tensor first \(torch.stack\(x, dim=1\)\)",
        ):
            model([TRAIN[:, 0], TRAIN[:, 1]])
        return
    call = model.eval() if mode == "eval" else model.predict
    with pytest.raises(
        TypeError,
        match=r"x must be a torch.Tensor of shape \(B, C, H, W\) or \(B, M, C, H, W\), but "
        r"got a list of 2 tensors; stack them into one tensor first \(torch.stack\(x, dim=0\)\)",
    ):
        call([EVAL[0], EVAL[1]])
    with pytest.raises(TypeError, match=r"but got a tuple of 2 items"):
        call((1, 2))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape .*, but got ndarray"):
        call(EVAL.numpy())


def test_the_model_on_another_device_than_the_input():
    model = tiny_model(2).to("meta")
    with pytest.raises(ValueError, match=r"x is on device cpu, not on meta like the encoder; move one of them"):
        model(TRAIN)


def test_autocast_accepts_a_lower_precision_input():
    model = tiny_model(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(TRAIN.bfloat16())  # a bfloat16 batch into a float32 model is what autocast is for
    assert out.logits.shape == (2, 2, 5)


def test_layer_entry_points():
    enc = _x(2, 2, 4, 8, 8)
    mixer = CutMixMixer(2)
    with pytest.raises(
        TypeError,
        match=r"encodings must be a torch.Tensor of shape \(B, M, C, H, W\), but got a list "
        r"of 2 tensors; stack them into one tensor first \(torch.stack\(encodings, dim=1\)\)",
    ):
        mixer([enc[:, 0], enc[:, 1]])
    with pytest.raises(TypeError, match=r"encodings must be a floating-point tensor, but got dtype torch.int64"):
        mixer(enc.long())
    _, info = mixer(enc)
    with pytest.raises(TypeError, match=r"info must be a MixInfo \(the mix_info of a training output\), but got tuple"):
        mixer.apply(enc, (info, None))
    unmixer = Unmixer("full")
    feats = _x(2, 6, 4, 4)
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor of shape \(B, C, h, w\), but got a list"):
        unmixer([feats], info)
    with pytest.raises(TypeError, match=r"info must be a MixInfo .*, but got list"):
        unmixer(feats, [info])
    with pytest.raises(TypeError, match=r"features must be a floating-point tensor, but got dtype torch.int64"):
        unmixer(feats.long(), info)
    with pytest.raises(ValueError, match=r"features is on device meta, not on cpu like the MixInfo"):
        unmixer(feats.to("meta"), info)
    with pytest.raises(TypeError, match=r"info must be a MixInfo"):
        mix(enc, "info")
    with pytest.raises(TypeError, match=r"info must be a MixInfo"):
        unmix_pool(feats, None)
    heads = MultiHead(6, 3, 2)
    with pytest.raises(
        TypeError,
        match=r"x must be a torch.Tensor of shape \(B, D\) or \(B, M, D\), but got a list of "
        r"2 tensors; stack them into one tensor first \(torch.stack\(x, dim=1\)\)",
    ):
        heads([_x(4, 6), _x(4, 6)])
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the parameters of the heads are torch.float32"):
        heads(_x(4, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, but got dtype torch.int64"):
        heads(_x(4, 6).long())
    with pytest.raises(ValueError, match=r"x is on device meta, not on cpu like the heads"):
        heads(_x(4, 6).to("meta"))
    with pytest.raises(TypeError, match=r"bias must be a bool, but got 'yes'"):
        MultiHead(6, 3, 2, bias="yes")
    encoder = MultiEncoder(nn.Conv2d(3, 4, 3), 2)
    with pytest.raises(
        TypeError,
        match=r"x must be a torch.Tensor of shape \(B, C, H, W\) or \(B, M, C, H, W\), but got "
        r"a list of 2 tensors; stack them into one tensor first \(torch.stack\(x, dim=1\)\)",
    ):
        encoder([TRAIN[:, 0], TRAIN[:, 1]])
    with pytest.raises(
        ValueError,
        match=r"x must have shape \(B, C, H, W\) or \(B, M, C, H, W\), but got a tensor of "
        r"shape \(3, 8, 8\)",
    ):
        encoder(EVAL[0])
    stem = MultiEncoder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 2)  # a generic encoder
    with pytest.raises(ValueError, match=r"x has 1 channels .* but the encoder expects 3"):
        stem(_x(2, 2, 1, 8, 8))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the parameters of the encoder are"):
        stem(_x(2, 2, 3, 8, 8, dtype=torch.float64))
    assert stem(_x(2, 2, 3, 8, 8)).shape == (2, 2, 4, 6, 6)
    with pytest.raises(TypeError, match=r"preserve_sum must be a bool, but got 1"):
        MultiEncoder(nn.Conv2d(3, 4, 3), 2, init="aligned", preserve_sum=1)


def _set(y: torch.Tensor, index: tuple[int, int], value: int) -> torch.Tensor:
    y = y.clone()
    y[index] = value
    return y


# -- targets -------------------------------------------------------------------------------------------------------
TARGET_CASES = [
    (
        "float",
        lambda y: y.float(),
        TypeError,
        r"targets must hold integer class indices \(int64\), but got dtype torch.float32; soft or one-hot",
    ),
    (
        "bool",
        lambda y: y > 2,
        TypeError,
        r"targets must hold integer class indices \(int64\), but got dtype torch.bool",
    ),
    (
        "equal to K",
        lambda y: _set(y, (1, 0), 5),
        ValueError,
        r"targets must hold class indices in \[0, 5\) \(K = 5 classes\), but targets\[1, 0\] = 5$",
    ),
    ("negative", lambda y: _set(y, (0, 1), -1), ValueError, r"but targets\[0, 1\] = -1$"),
    (
        "-100 without ignore_index",
        lambda y: _set(y, (2, 1), -100),
        ValueError,
        r"but targets\[2, 1\] = -100 \(-100 is cross-entropy's usual ignore_index: pass ignore_index=-100",
    ),
    ("wrong shape", lambda y: y[:, 0], ValueError, r"targets must have shape \(B, M\) = \(3, 2\), but got \(3,\)"),
    ("another device", lambda y: y.to("meta"), ValueError, r"targets is on device meta, not on cpu like the logits"),
    (
        "a list",
        lambda y: [y[:, 0], y[:, 1]],
        TypeError,
        r"targets must be a torch.Tensor of shape \(B, M\), but got a list of 2 tensors; stack them into one tensor "
        r"first \(torch.stack\(targets, dim=1\)\)",
    ),
]
Y = torch.tensor([[0, 1], [2, 3], [4, 0]])


@pytest.mark.parametrize("case", TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
@pytest.mark.parametrize("entry", ["MIMOLoss", "make_loss", "functional"])
def test_bad_targets(case, entry):
    _, bad, error, match = case
    model = tiny_model(2)
    out = model(_x(3, 2, 3, 8, 8))
    with pytest.raises(error, match=match):
        if entry == "functional":
            mimo_cross_entropy(out.logits, bad(Y))
        else:
            (MIMOLoss() if entry == "MIMOLoss" else model.make_loss())(out, bad(Y))


def test_integer_targets_of_any_width_are_accepted():
    logits = _x(3, 2, 5)
    expected = mimo_cross_entropy(logits, Y)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(mimo_cross_entropy(logits, Y.to(dtype)), expected, rtol=0, atol=0)


def test_integer_logits_are_refused():
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor, but got dtype torch.int64"):
        mimo_cross_entropy(torch.zeros(3, 2, 5, dtype=torch.long), Y)


def _reference_ignored_ce(logits, targets, weights, ignore, smoothing):
    """Per member: the weighted CE of its labelled samples divided by their count, summed over members (float64)."""
    total = 0.0
    b, m, _ = logits.shape
    for i in range(m):
        terms = []
        for r in range(b):
            t = int(targets[r, i])
            if t == ignore:
                continue
            logp = torch.log_softmax(logits[r, i].double(), dim=-1)
            ce = -(1 - smoothing) * logp[t] - smoothing * logp.mean()
            terms.append(float(weights[r, i]) * float(ce))
        total += sum(terms) / len(terms) if terms else 0.0
    return total


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ignore_index_skips_labels_with_a_correct_mean(smoothing):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(5, (6, 3), generator=g)
    targets[[0, 2, 3], [0, 0, 1]] = -100
    targets[:, 2] = -100  # a member with no label adds 0
    info = sample_mix_params(6, 3, 8, 8, cutmix_prob=1.0, dtype=torch.float64, generator=g)
    loss = MIMOLoss(3.0, label_smoothing=smoothing, ignore_index=-100)(logits, targets, info)
    weights = MIMOLoss(3.0).weights(info)
    expected = _reference_ignored_ce(logits, targets, weights, -100, smoothing)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    # with no ignored label the mean is the plain one
    full = torch.randint(5, (6, 3), generator=g)
    torch.testing.assert_close(
        MIMOLoss(None, ignore_index=-100)(logits, full), mimo_cross_entropy(logits, full), rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match=r"ignore_index must not be a class index in \[0, 5\), but got 2"):
        MIMOLoss(ignore_index=2)(logits, full)
    with pytest.raises(ValueError, match=r"but targets\[0, 0\] = -7 \(ignore_index=-100\)"):
        MIMOLoss(ignore_index=-100)(logits, _set(full, (0, 0), -7))
    assert repr(MIMOLoss(ignore_index=-100)) == "MIMOLoss(rebalance_root='auto', label_smoothing=0, ignore_index=-100)"


def test_device_targets_are_not_read_and_meet_the_kernel_range_check(monkeypatch):
    # On a GPU the range is not checked by the library (that would be a host synchronisation); what stops a bad
    # label there is the cross-entropy kernel's own range check. Simulate a device tensor: the CPU kernel's check then
    # fires, and -100 in particular is *not* silently dropped (the library passes an ignore_index no label can hold).
    import mixshare_layers._checks as checks

    monkeypatch.setattr(checks, "values_checked", lambda t: False)
    logits = _x(3, 2, 5)
    with pytest.raises(IndexError, match="out of bounds"):
        mimo_cross_entropy(logits, torch.tensor([[0, -100], [1, 2], [3, 4]]))
    with pytest.raises(IndexError, match="out of bounds"):
        mimo_cross_entropy(logits, torch.tensor([[0, 5], [1, 2], [3, 4]]))


def test_value_check_modes():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert get_value_checks() == "cpu"
    assert values_checked(cpu) and not values_checked(meta)
    set_value_checks("never")
    assert not values_checked(cpu)
    with pytest.raises(IndexError):  # the library let it through: torch's own check answers
        mimo_cross_entropy(_x(3, 2, 5), torch.where(Y == 0, 7, Y))
    set_value_checks("always")
    assert values_checked(cpu) and not values_checked(meta)
    with pytest.raises(ValueError, match=r"mode must be one of 'cpu', 'always', 'never', but got 'sometimes'"):
        set_value_checks("sometimes")


def test_value_checks_stay_out_of_compiled_graphs():
    loss = torch.compile(MIMOLoss(None), backend="eager", fullgraph=True)
    torch.testing.assert_close(loss(_x(3, 2, 5), Y), mimo_cross_entropy(_x(3, 2, 5), Y))


def test_auto_loss_refuses_to_guess_for_a_bare_mix():
    enc = _x(3, 2, 4, 8, 8)
    _, info = CutMixMixer(2)(enc)
    with pytest.raises(
        ValueError,
        match=r"MIMOLoss\(rebalance_root='auto'\) takes its weights from the MixInfo of a "
        r"MIMOWrapper's training output, but this MixInfo carries none .*MIMOLoss\(rebalance_root=3.0\)",
    ):
        MIMOLoss()(_x(3, 2, 5), Y, info)
    # an explicit root computes the weights from the ratios, as before
    assert MIMOLoss(1.0)(_x(3, 2, 5), Y, info).shape == ()
    with pytest.raises(ValueError, match=r"rebalance_root must be 'auto', a number > 0 or None, but got 'mixmo'"):
        MIMOLoss("mixmo")
    with pytest.raises(TypeError, match=r"info must be a MixInfo, but got tuple"):
        MIMOLoss()(_x(3, 2, 5), Y, (info,))


# -- batcher -------------------------------------------------------------------------------------------------------
def test_batcher_refuses_float_labels_and_mismatched_devices():
    x = _x(4, 3, 8, 8)
    with pytest.raises(TypeError, match=r"y must hold integer class indices, but got dtype torch.float32; .*y.argmax"):
        MIMOBatcher(2)(x, torch.rand(4))
    with pytest.raises(TypeError, match=r"y must be a torch.Tensor of shape \(B,\), but got a list of 4 items"):
        MIMOBatcher(2)(x, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"y is on device meta, not on cpu like x"):
        MIMOBatcher(2)(x, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(
        ValueError,
        match=r"the batcher's generator is on cpu but the data is on meta; give a "
        r"torch.Generator\(device='meta'\)",
    ):
        MIMOBatcher(2, generator=torch.Generator())(x.to("meta"), torch.zeros(4, dtype=torch.long, device="meta"))
    # uint8 images are fine here: a transform may convert them
    xs, ys = MIMOBatcher(2, transform=lambda t: t.float() / 255)((x * 10).to(torch.uint8), torch.arange(4))
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64


# -- construction --------------------------------------------------------------------------------------------------
def test_pretrained_must_be_a_bool():
    for value in ("no", "False", 0, 1, None):
        with pytest.raises(TypeError, match=rf"pretrained must be a bool, but got {value!r}"):
            tiny_model(2, pretrained=value)
    assert tiny_model(2, pretrained=np.bool_(True)).pretrained is True


@pytest.mark.parametrize("preset", ["mimo", "mixmo", "unmix"])
def test_pretrained_with_independent_encoders_is_refused_with_the_fix(preset):
    with pytest.raises(
        ValueError,
        match=rf"pretrained=True starts the network as the backbone, but preset "
        rf"'{preset}' has independent encoders .* Pass encoder_init='aligned'",
    ):
        tiny_model(2, preset, pretrained=True)
    # the advice works: the network then starts as the backbone (eval logits of every member)
    split = tiny_split()
    backbone = nn.Sequential(split.encoder, split.core, nn.AdaptiveAvgPool2d(1), nn.Flatten(), split.classifier).eval()
    x = _x(3, 3, 8, 8)
    with torch.no_grad():
        expected = backbone(x)
        model = MIMOWrapper(num_subnetworks=2, preset=preset, split=split, pretrained=True, encoder_init="aligned")
        got = model.eval()(x)
    for i in range(2):
        torch.testing.assert_close(got[:, i], expected)


def test_numpy_and_tensor_numbers_are_accepted():
    model = MIMOWrapper(
        num_subnetworks=np.int64(3),
        preset="mixshare",
        split=tiny_split(),
        alpha=np.float32(1.5),
        fadeout_end=torch.tensor(0.5),
    )
    assert model.num_subnetworks == 3 and type(model.num_subnetworks) is int
    assert model.config.alpha == 1.5 and type(model.config.alpha) is float
    assert model.config.fadeout_end == 0.5 and type(model.config.fadeout_end) is float
    for p in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), 0.25):
        model.set_progress(p)
        assert float(model.progress) == 0.25
    model.set_progress(np.int64(1))
    assert float(model.progress) == 1.0
    assert MIMOBatcher(np.int32(2), np.int64(2), np.float32(0.5)).batch_repetition == 2
    assert MultiHead(np.int64(6), np.int16(3), np.uint8(2)).weight.shape == (2, 3, 6)
    assert CutMixMixer(np.int64(2), alpha=np.float16(2.0), cutmix_prob=torch.tensor(1.0)).cutmix_prob == 1.0
    assert Unmixer("partial", fraction=np.float32(0.5)).fraction == 0.5
    assert MIMOLoss(np.float32(3.0), np.float64(0.1)).rebalance_root == 3.0
    assert MixInfo.identity(np.int64(2), np.int64(2), np.int64(4), np.int64(4)).inside.shape == (2, 2)
    assert MIMOConfig(alpha=np.int64(1), shuffle_roles=np.bool_(False)).shuffle_roles is False


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: check_int("n", 2.0), TypeError, r"n must be an int, but got 2.0 of type float"),
        (lambda: check_int("n", True), TypeError, r"n must be an int, but got True of type bool"),
        (lambda: check_int("n", np.bool_(True)), TypeError, r"n must be an int, but got .*True"),
        (lambda: check_int("n", np.float64(2)), TypeError, r"n must be an int, but got .*of type float64"),
        (
            lambda: check_int("n", torch.tensor([2])),
            ValueError,
            r"n must be an int \(as a tensor: 0-dim\), but got a tensor of shape \(1,\)",
        ),
        (lambda: check_int("n", torch.tensor(2.0)), TypeError, r"n must be an int, but got tensor\(2.\)"),
        (
            lambda: check_int("n", torch.tensor(True)),
            TypeError,
            r"n must be an int, but got a 0-dim tensor of dtype torch.bool",
        ),
        (lambda: check_int("n", np.int64(-1), minimum=0), ValueError, r"n must be an integer >= 0, but got -1"),
        (lambda: check_real("r", np.bool_(True)), TypeError, r"r must be a real number, but got .*True"),
        (lambda: check_real("r", "1"), TypeError, r"r must be a real number, but got '1' of type str"),
        (lambda: check_real("r", np.float32("nan")), ValueError, r"r must be finite, but got nan"),
        (
            lambda: check_real("r", torch.ones(2)),
            ValueError,
            r"r must be a real number \(as a tensor: 0-dim\), but got a tensor of shape \(2,\)",
        ),
        (
            lambda: check_real("r", torch.tensor(1j)),
            TypeError,
            r"r must be a real number, but got a 0-dim tensor of dtype torch.complex64",
        ),
        (lambda: check_real("r", torch.tensor(2.0), high=1.0), ValueError, r"r must be in \[-inf, 1\], but got 2"),
        (lambda: check_bool("b", 1), TypeError, r"b must be a bool, but got 1 of type int"),
    ],
)
def test_number_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_set_progress_errors():
    model = tiny_model(2)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], but got 1.5"):
        model.set_progress(torch.tensor(1.5))  # a CPU tensor is read: its range is checked
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], but got -0.5"):
        model.set_progress(np.float32(-0.5))
    with pytest.raises(TypeError, match=r"progress must be a real number, but got '0.5' of type str"):
        model.set_progress("0.5")
    with pytest.raises(ValueError, match=r"progress must be a real number \(as a tensor: 0-dim\), but got a tensor"):
        model.set_progress(torch.tensor([0.5]))
    assert math.isclose(float(model.progress), 0.0)


def test_tensor_progress_on_a_device_is_copied_without_being_read(monkeypatch):
    import mixshare_layers.wrapper as wrapper

    model = tiny_model(2)
    monkeypatch.setattr(wrapper, "values_checked", lambda t: False)  # as for a CUDA tensor in the default mode
    p = torch.tensor(0.75, dtype=torch.float64)
    model.set_progress(p)
    assert float(model.progress) == 0.75 and model.progress.dtype == torch.float32
    with pytest.raises(
        ValueError,
        match=r"progress must be a number or a 0-dim real tensor, but got a tensor of shape "
        r"\(2,\) and dtype torch.float32",
    ):
        model.set_progress(torch.ones(2))


def test_empty_batch_is_accepted_everywhere():
    # a deliberate choice: B = 0 flows through (logits (0, M, K), a zero loss with zero gradients), as in torch
    model = tiny_model(3)
    out = model(_x(0, 3, 3, 8, 8))
    assert out.logits.shape == (0, 3, 5) and out.mix_info.loss_weights.shape == (0, 3)
    loss = model.make_loss()(out, torch.zeros(0, 3, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)
    assert float(MIMOLoss(ignore_index=-100)(out, torch.zeros(0, 3, dtype=torch.long)).detach()) == 0.0
    assert model.eval()(_x(0, 3, 8, 8)).shape == (0, 3, 5)
    xs, ys = MIMOBatcher(3, 2)(_x(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    assert xs.shape == (0, 3, 3, 8, 8) and ys.shape == (0, 3)


def test_errors_come_from_the_library_not_from_torch_internals():
    # the cases of the issue, each answered before any convolution runs (no RuntimeError / AttributeError)
    model = tiny_model(2)
    bad_inputs = [
        _x(2, 2, 1, 8, 8),
        TRAIN.to(torch.uint8),
        TRAIN.long(),
        TRAIN.double(),
        TRAIN.to("meta"),
        [TRAIN[:, 0], TRAIN[:, 1]],
    ]
    for x in bad_inputs:
        with pytest.raises((TypeError, ValueError)) as err:
            model(x)
        assert str(err.value).startswith("x ")
