"""mixshare_layers.checkpoint.runs: a run folder's checkpoint rotation, resuming from it, and its one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoint_cases import make_case

from mixshare_layers.checkpoint import (
    CHECKPOINT_NAME,
    RunError,
    check_run_folder,
    load_checkpoint,
    restore_training,
    resume_run,
    rng_state,
    save_checkpoint,
    save_run_checkpoint,
    verify_checkpoint,
)

COMMAND = "python train.py --resume"


def _state(epoch: int, value: float = 0.0) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    return {"config": {"lr": 0.1, "epoch_of": epoch}, "epoch": epoch, "model": model.state_dict(), "history": []}


def _run(tmp_path: Path, epochs: int = 2) -> Path:
    run = tmp_path / "run"
    for epoch in range(1, epochs + 1):
        save_run_checkpoint(run, _state(epoch, float(epoch)))
    return run


def test_rotation_keeps_the_previous_verified_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    path = save_run_checkpoint(run, _state(1), {"g": torch.Generator().manual_seed(3)})
    assert path == run / CHECKPOINT_NAME and not (run / "checkpoint.prev.pt").exists()
    ckpt = load_checkpoint(path, require_digest=True)
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"torch", "g"}
    (run / ".checkpoint.pt.x1.tmp").write_bytes(b"half a file")  # left by a process killed while saving
    save_run_checkpoint(run, _state(2))
    assert load_checkpoint(run / CHECKPOINT_NAME)["epoch"] == 2 and verify_checkpoint(run / "checkpoint.prev.pt")
    assert load_checkpoint(run / "checkpoint.prev.pt")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    run = _run(tmp_path, 1)
    before = (run / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(RunError, match=r"checkpoint\.pt not written: 'weight' holds values that are not finite"):
        save_run_checkpoint(run, _state(2, float("nan")))
    assert (run / CHECKPOINT_NAME).read_bytes() == before and not (run / "checkpoint.prev.pt").exists()


def test_check_run_folder(tmp_path: Path) -> None:
    check_run_folder(tmp_path / "new" / "run", new=True)  # nothing there yet: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    run = _run(tmp_path, 1)
    with pytest.raises(RunError, match=rf"^--out-dir: {run} already holds a run: continue it with {COMMAND} {run}"):
        check_run_folder(run, new=True, resume_command=COMMAND, option="--out-dir")
    check_run_folder(run, new=False)  # resuming into it: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match=r"cannot write the run folder .*file.*which is a file"):
        check_run_folder(tmp_path / "file" / "run", new=True)


def test_resume_run_from_the_folder_or_exactly_the_file(tmp_path: Path) -> None:
    run = _run(tmp_path)
    path, checkpoint, config, verified = resume_run(run, required=("epoch", "model"))
    assert path == run / CHECKPOINT_NAME and checkpoint["epoch"] == 2 and verified
    assert config == {"lr": 0.1, "epoch_of": 2}
    (run / CHECKPOINT_NAME).rename(run / "kept.pt")  # a file of its own: resumed from exactly it
    path, checkpoint, _, _ = resume_run(run / "kept.pt")
    assert path == run / "kept.pt" and checkpoint["epoch"] == 2


def test_resume_run_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"^--resume: .*nowhere does not exist: give a run folder or a checkpoint file"):
        resume_run(tmp_path / "nowhere", option="--resume")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a run folder"):
        resume_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(RunError, match=r"config\.json but no checkpoint\.pt: .*nothing to resume"):
        resume_run(tmp_path / "empty")
    run = _run(tmp_path)
    (run / CHECKPOINT_NAME).unlink()
    with pytest.raises(RunError, match=rf"only checkpoint\.prev\.pt .*: resume from it with {COMMAND} {run}/check"):
        resume_run(run, resume_command=COMMAND)
    save_checkpoint(run / CHECKPOINT_NAME, {"epoch": 3})
    with pytest.raises(RunError, match="is not a training checkpoint of this run: it lacks model, history"):
        resume_run(run, required=("epoch", "model", "history"))


def test_damaged_checkpoint_names_the_previous_good_file_and_the_command(tmp_path: Path) -> None:
    run = _run(tmp_path)
    make_case("flipped_tensor_byte", run / CHECKPOINT_NAME, run / CHECKPOINT_NAME, tmp_path / "marker")
    prev = run / "checkpoint.prev.pt"
    with pytest.raises(RunError) as info:
        resume_run(run, resume_command=COMMAND, option="--resume")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--resume: checkpoint {run / CHECKPOINT_NAME}: ")
    assert "do not match the SHA-256 digest" in message
    assert message.endswith(f"the previous checkpoint {prev} is intact: resume from it with {COMMAND} {prev}")
    assert resume_run(prev)[1]["epoch"] == 1  # and that command works
    # the previous file damaged too: no such advice, the library's hint instead
    make_case("truncated", prev, prev, tmp_path / "marker")
    with pytest.raises(RunError) as info:
        resume_run(run, resume_command=COMMAND)
    assert "resume from it with" not in str(info.value) and "previous checkpoint" in str(info.value)


def test_resume_never_overwrites_another_good_checkpoint(tmp_path: Path) -> None:
    run = _run(tmp_path)
    save_run_checkpoint(tmp_path / "elsewhere", _state(1))
    (tmp_path / "elsewhere" / CHECKPOINT_NAME).rename(run / "epoch1.pt")
    with pytest.raises(RunError, match=rf"epoch1\.pt: the run folder already holds {run / CHECKPOINT_NAME}, which "
                                       r"continuing from epoch1\.pt would overwrite"):  # fmt: skip
        resume_run(run / "epoch1.pt")
    make_case("truncated", run / CHECKPOINT_NAME, run / CHECKPOINT_NAME, tmp_path / "marker")
    assert resume_run(run / "epoch1.pt")[1]["epoch"] == 1  # a damaged one is replaced


def test_config_of_an_older_checkpoint_comes_from_config_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "model": {}}, run / CHECKPOINT_NAME)  # no digest, no config: an older script's
    with pytest.raises(RunError, match=r"holds no config .* and .*config\.json is missing"):
        resume_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunError, match=r"config\.json cannot be read \(Expecting property name"):
        resume_run(run)
    (run / "config.json").write_text("[1]")
    with pytest.raises(RunError, match=r"config\.json does not hold a config \(a JSON object\)"):
        resume_run(run)
    (run / "config.json").write_text(json.dumps({"lr": 0.5}))
    _, _, config, verified = resume_run(run)
    assert config == {"lr": 0.5} and verified is False


def test_restore_training_puts_states_and_generators_back(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    gens = {"data": torch.Generator().manual_seed(5)}
    torch.rand(3, generator=gens["data"])
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "rng": [rng_state(gens)]}
    expected = torch.rand(2, generator=gens["data"])
    fresh, fresh_gens = torch.nn.Linear(3, 2), {"data": torch.Generator().manual_seed(0)}
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert restore_training(saved, {"model": fresh, "optimizer": fresh_opt, "scaler": scaler}, fresh_gens)
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    assert torch.equal(torch.rand(2, generator=fresh_gens["data"]), expected)
    # saved by two processes, resumed by one: the states load, the generators keep their seeds
    assert not restore_training({**saved, "rng": saved["rng"] * 2}, {"model": fresh}, fresh_gens)
    assert not restore_training(saved, {"model": fresh}, {"other": torch.Generator()})  # saved with other names
    with pytest.raises(RunError, match=r"^--resume: checkpoint x does not fit the model it is loaded into \(.*size"):
        restore_training(saved, {"model": torch.nn.Linear(3, 5)}, {}, source="--resume: checkpoint x")


def test_errors_are_value_errors_on_one_line(tmp_path: Path) -> None:
    assert issubclass(RunError, ValueError)
    os.mkdir(tmp_path / "run")
    with pytest.raises(RunError) as info:
        resume_run(tmp_path / "run")
    assert "\n" not in str(info.value)
