"""API traps: the loss takes the preset's weighting from the output, progress can drive itself
(total-steps mode, on device) and a forgotten progress warns; the wrapper shares the backbone's core."""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mixshare_layers import BackboneSplit, MIMOLoss, MIMOWrapper, ProgressWarning
from mixshare_layers.functional import rebalanced_weights


def tiny_split(num_classes: int = 5) -> BackboneSplit:
    encoder = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    core = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
    return BackboneSplit(encoder=encoder, core=core, classifier=nn.Linear(12, num_classes))


def tiny_model(m: int = 2, preset: str = "mixshare", **kw) -> MIMOWrapper:
    return MIMOWrapper(num_subnetworks=m, preset=preset, split=tiny_split(), **kw)


def _x(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _record_progress(model: MIMOWrapper) -> list[float]:
    """The progress each training forward ran at, as the unmixer saw it."""
    seen: list[float] = []
    model.unmixer.register_forward_pre_hook(lambda mod, args: seen.append(float(args[2])))
    return seen


# -- (a) the loss takes the preset's weighting from the output -----------------------------------------------------
@pytest.mark.parametrize("preset", ["mimo", "mixmo", "unmix", "unmix-aligned", "mixshare", "mixshare-partial"])
def test_loss_weights_travel_with_the_output(preset):
    model = tiny_model(3, preset)
    out = model(_x(6, 3, 3, 8, 8))
    root = model.config.rebalance_root
    weights = out.mix_info.loss_weights
    torch.testing.assert_close(weights, rebalanced_weights(out.mix_info.ratios, root), rtol=0, atol=0)
    torch.testing.assert_close(weights.sum(1), torch.full((6,), 3.0))  # every row sums to M
    y = torch.randint(5, (6, 3), generator=torch.Generator().manual_seed(1))
    logits, info = out  # unpacking still works
    expected = MIMOLoss(root)(logits, y, info)
    for loss in (MIMOLoss(), model.make_loss(), MIMOLoss("auto")):
        torch.testing.assert_close(loss(out, y), expected, rtol=0, atol=0)
    # an explicit root overrides the preset's (MIMO's uniform ratios give weights of 1 whatever the root)
    if root != 1.0 and model.config.alpha > 0:
        assert not torch.equal(MIMOLoss(1.0)(out, y), expected)
    # the weights follow the info when it is split or moved
    sub = info.index_select(torch.tensor([4, 1]))
    torch.testing.assert_close(sub.loss_weights, weights[[4, 1]])
    assert info.to(dtype=torch.float64).loss_weights.dtype == torch.float64


def test_eval_output_and_plain_logits_are_unweighted():
    model = tiny_model(2, "mixmo").eval()
    logits = model(_x(4, 3, 8, 8))
    y = torch.zeros(4, 2, dtype=torch.long)
    torch.testing.assert_close(MIMOLoss()(logits, y), MIMOLoss(None)(logits, y))


# -- (b) progress: the total-steps mode ----------------------------------------------------------------------------
def test_total_steps_advance_progress_by_themselves():
    model = tiny_model(2, "mixshare", total_steps=4)
    seen = _record_progress(model)
    for _ in range(6):
        model(_x(2, 2, 3, 8, 8))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # steps / total, then held at 1
    assert int(model.num_steps) == 6 and int(model.total_steps) == 4
    model.eval()(_x(2, 3, 8, 8))  # eval forwards do not count
    model.predict(_x(2, 3, 8, 8))
    assert int(model.num_steps) == 6
    model.train()
    model.set_total_steps(10, step=5)
    model(_x(2, 2, 3, 8, 8))
    assert seen[-1] == 0.5 and int(model.num_steps) == 6


def test_total_steps_drive_fadeout():
    model = tiny_model(2, "mixshare", total_steps=9)  # fadeout ends at 1/3 of training: step 3
    pooled = []
    model.heads.register_forward_pre_hook(lambda mod, args: pooled.append(args[0]))
    for _ in range(4):
        model(_x(4, 2, 3, 8, 8))
    assert not torch.allclose(pooled[0][:, 0], pooled[0][:, 1])  # step 0: full unmixing
    torch.testing.assert_close(pooled[3][:, 0], pooled[3][:, 1])  # step 3: faded out, one shared vector


def test_set_progress_and_total_steps_exclude_each_other():
    model = tiny_model(2, "mixshare", total_steps=8)
    model(_x(2, 2, 3, 8, 8))
    model(_x(2, 2, 3, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"progress is driven by the step counter \(total_steps=8\); call "
        r"model.set_total_steps\(None\) first to set it by hand",
    ):
        model.set_progress(0.5)
    model.set_total_steps(None)  # back to manual, the progress kept
    seen = _record_progress(model)
    model(_x(2, 2, 3, 8, 8))
    assert seen == [0.125] and int(model.num_steps) == 2
    model.set_progress(0.5)
    with pytest.raises(ValueError, match=r"total_steps must be an integer >= 1, but got 0"):
        model.set_total_steps(0)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, but got -1"):
        model.set_total_steps(5, step=-1)
    with pytest.raises(TypeError, match=r"total_steps must be an int, but got 10.0"):
        tiny_model(2, total_steps=10.0)


def test_total_steps_state_dict_round_trip_and_copies():
    torch.manual_seed(0)
    model = tiny_model(2, "mixshare", total_steps=10)
    for _ in range(4):
        model(_x(2, 2, 3, 8, 8))
    state = model.state_dict()
    assert int(state["num_steps"]) == 4 and int(state["total_steps"]) == 10
    fresh = tiny_model(2, "mixshare")  # built without total_steps: loading restores the mode
    fresh.load_state_dict(state)
    for other in (fresh, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        seen = _record_progress(other)
        g = torch.Generator().manual_seed(3)
        other(_x(2, 2, 3, 8, 8), generator=g)
        assert seen == [pytest.approx(0.4)] and int(other.num_steps) == 5
        with pytest.raises(ValueError, match="progress is driven by the step counter"):
            other.set_progress(0.1)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(
        fresh(_x(2, 2, 3, 8, 8), generator=torch.Generator().manual_seed(4)).logits,
        reference(_x(2, 2, 3, 8, 8), generator=torch.Generator().manual_seed(4)).logits,
    )
    # a manual-mode checkpoint switches a steps-mode model back to manual
    manual = tiny_model(2, "mixshare")
    manual.set_progress(0.3)
    model.load_state_dict(manual.state_dict())
    model.set_progress(0.6)
    # a state dict written before the step buffers existed still loads (manual mode)
    old = {k: v for k, v in manual.state_dict().items() if k not in ("num_steps", "total_steps")}
    again = tiny_model(2, "mixshare", total_steps=5)
    again.load_state_dict(old)
    again.set_progress(0.2)
    assert float(again.progress) == pytest.approx(0.2)


def test_total_steps_under_compile_fullgraph():
    model = tiny_model(3, "mixshare", total_steps=6)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for b in (4, 3, 3):  # a recompilation (dynamic shapes) keeps counting
        out = compiled(_x(b, 3, 3, 8, 8))
        assert out.logits.shape == (b, 3, 5)
    assert int(model.num_steps) == 3 and float(model.progress) == pytest.approx(2 / 6)
    model.set_total_steps(6, step=5)  # in place: the compiled graph reads the buffers
    compiled(_x(2, 3, 3, 8, 8))
    assert int(model.num_steps) == 6 and float(model.progress) == pytest.approx(5 / 6)


# -- (b) progress: the warning when it is forgotten ----------------------------------------------------------------
def _run(model: MIMOWrapper, n: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            model(_x(2, 2, 3, 8, 8))
    return [w for w in caught if issubclass(w.category, ProgressWarning)]


@pytest.mark.parametrize("preset,what", [("mixshare", "fadeout unmixing"), ("mixmo", "the CutMix ramp")])
def test_a_forgotten_progress_warns_once(preset, what):
    model = tiny_model(2, preset)
    model.stale_progress_warning = 5
    assert _run(model, 4) == []
    caught = _run(model, 3)
    assert len(caught) == 1  # at the 5th forward, once
    message = str(caught[0].message)
    assert f"5 training forwards have run with progress still 0, but {what} of preset '{preset}'" in message
    assert "model.set_total_steps(num_epochs * steps_per_epoch)" in message
    assert caught[0].filename == __file__  # attributed to the caller of the module
    model.set_progress(0.0)  # the same value again is not progress: the same stale stretch, already warned
    assert _run(model, 10) == []
    model.set_progress(0.1)  # a new value restarts the count
    assert _run(model, 4) == []
    model.set_progress(0.2)
    assert _run(model, 4) == []


def test_no_warning_where_progress_is_read_by_nothing_or_driven():
    for model in (tiny_model(2, "mixshare-partial"), tiny_model(2, "mimo"), tiny_model(2, "mixshare", total_steps=3)):
        model.stale_progress_warning = 2
        assert _run(model, 4) == []
    model = tiny_model(2, "mixshare")
    model.stale_progress_warning = None
    assert _run(model, 4) == []
    model = tiny_model(2, "mixshare")
    model.stale_progress_warning = 2
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProgressWarning)  # the count stays out of compiled graphs
        for _ in range(4):
            compiled(_x(2, 2, 3, 8, 8))


# -- (c) the wrapper shares the backbone's core --------------------------------------------------------------------
def test_the_core_is_the_backbones_own_and_trains_in_place():
    torchvision = pytest.importorskip("torchvision")
    backbone = torchvision.models.resnet18(num_classes=5)
    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    model = MIMOWrapper(backbone, 2, "mixshare", pretrained=True)
    assert model.core[3] is backbone.layer1  # the same modules, not copies
    assert model.encoder.weight.data_ptr() != backbone.conv1.weight.data_ptr()  # the stem and head are copies
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.make_loss()(model(_x(2, 2, 3, 48, 48)), torch.zeros(2, 2, dtype=torch.long))
    loss.backward()
    opt.step()
    changed = {name for name, p in backbone.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("layer") for name in changed)  # training the wrapper trained the backbone's core
    assert not any(name.startswith(("conv1", "fc")) for name in changed)  # its own stem and classifier stayed
    kept = copy.deepcopy(torchvision.models.resnet18(num_classes=5))
    snapshot = copy.deepcopy(kept.state_dict())
    MIMOWrapper(copy.deepcopy(kept), 2, "mixshare", pretrained=True)  # the documented way to keep the original
    assert all(torch.equal(v, snapshot[k]) for k, v in kept.state_dict().items())


# -- DDP: two ranks count the same steps ---------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tiny_model(2, "mixshare", total_steps=6)
        ddp = nn.parallel.DistributedDataParallel(model)
        seen = _record_progress(model)
        loss_fn = model.make_loss()
        for step in range(4):
            out = ddp(_x(4, 2, 3, 8, 8, seed=10 * rank + step))
            loss_fn(out, torch.randint(5, (4, 2))).backward()
        queue.put((rank, seen, int(model.num_steps), [p.grad.sum().item() for p in model.parameters()][:3]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_total_steps_under_ddp_two_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # a fresh interpreter per rank, as torchrun gives
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, seen0, steps0, grads0), (_, seen1, steps1, grads1) = results
    assert seen0 == seen1 == pytest.approx([0.0, 1 / 6, 2 / 6, 3 / 6])
    assert steps0 == steps1 == 4
    assert grads0 == pytest.approx(grads1)  # DDP averaged the gradients: the ranks agree


# -- CUDA: the counter runs on device, without synchronisation, and in a captured graph -------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_total_steps_never_sync_and_count_in_a_cuda_graph():
    from mixshare_layers.models import wide_resnet

    torch.manual_seed(0)
    model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2, "mixshare", total_steps=8).cuda().train()
    loss_fn = MIMOLoss()
    x = torch.randn(8, 2, 3, 32, 32, device="cuda")
    y = torch.randint(10, (8, 2), device="cuda")

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the checks, the counter and the loss weights never read the device
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    model.set_total_steps(8)  # reset the counter the warm-up steps advanced (in place: the graph sees it)
    progress = []
    for _ in range(10):
        graph.replay()
        progress.append(float(model.progress))
    assert progress == pytest.approx([min(1.0, i / 8) for i in range(10)])
    assert int(model.num_steps) == 10
