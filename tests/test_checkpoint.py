"""mixshare_layers.checkpoint: the safe loader, the digest, the kept previous file, conversion, the command line."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pathlib
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mixshare_layers.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    convert_checkpoint,
    load_checkpoint,
    plain_value_problem,
    previous_checkpoint_path,
    save_checkpoint,
    store,
    to_plain,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


class CodeRunner:
    """Unpickling this runs code: it creates ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _payload() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3, dtype=torch.float64)},
        "config": {"depth": 10, "method": "mixshare", "milestones": [0.25, 0.5], "lr": None},
        "rng": (3, tuple(range(5)), None),
        "epoch": 2,
    }


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_and_plain_torch_load(tmp_path: Path) -> None:
    payload = _payload()
    path = save_checkpoint(tmp_path / "sub" / "ck.pt", payload)  # missing folders are created
    assert verify_checkpoint(path) is True
    _same(load_checkpoint(path), payload)  # exactly what was given, without the format keys
    raw = torch.load(path, weights_only=True)  # still a plain torch.save archive
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    _same({k: v for k, v in raw.items() if not k.startswith("format")}, payload)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ck.pt"]  # no temporary file left


def test_every_flipped_byte_is_caught(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", {"model": {"w": torch.arange(6.0)}, "step": 3})
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data)
    loaded = 0
    with open(bad, "r+b") as fh:
        for i in range(len(data)):  # a single-bit error at every position of the file, header to digest
            fh.seek(i)
            fh.write(bytes([data[i] ^ 0x10]))
            fh.flush()
            try:
                has_digest = verify_checkpoint(bad)  # hashing only: fast
            except CheckpointError as err:
                assert err.damaged, i
            else:
                assert not has_digest, i  # the flip hit the digest's own tag: the loader must see the damage
                loaded += 1
                with pytest.raises(CheckpointError) as info:
                    load_checkpoint(bad)
                assert info.value.damaged, (i, str(info.value))
            fh.seek(i)
            fh.write(data[i : i + 1])
    assert loaded == len(store._TAG)
    data = path.read_bytes()
    for cut in (1, 50, len(data) // 2, len(data) - 1):  # truncated anywhere
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"truncated or damaged|not a zip archive|is damaged"):
            load_checkpoint(bad)
    bad.write_bytes(data + b"\0")  # one byte added at the end
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(bad)


def _reference_digest(body: bytes, block: int | None = None) -> str:
    """The documented digest, computed directly: the SHA-256 of the bytes before the archive comment, its length
    counted as zeros; ``block``: format version 1's, the SHA-256 of the SHA-256s of ``block``-byte blocks."""
    body = body[:-2] + b"\0\0"
    if block is None:
        return hashlib.sha256(body).hexdigest()
    top = hashlib.sha256()
    for start in range(0, len(body), block):
        top.update(hashlib.sha256(body[start : start + block]).digest())
    return top.hexdigest()


@pytest.mark.parametrize("block", [2, 3, 5, 64, 1000, 4 << 20])
def test_digest_matches_its_definition_at_every_read_size(tmp_path: Path, monkeypatch, block: int) -> None:
    # small reads put their boundaries everywhere, in particular inside the archive's last bytes
    monkeypatch.setattr(store, "_BLOCK", block)
    for n in range(0, 40, 13 if block < 64 else 3):
        path = save_checkpoint(tmp_path / f"ck{n}.pt", {"w": torch.arange(float(n)), "name": "x" * n})
        data = path.read_bytes()
        body, trailer = data[: -store._TRAILER_SIZE], data[-store._TRAILER_SIZE :]
        assert body[-2:] == store._TRAILER_SIZE.to_bytes(2, "little")  # the archive comment's length
        assert trailer == store._TAG + _reference_digest(body).encode(), n
        assert verify_checkpoint(path) and torch.equal(load_checkpoint(path)["w"], torch.arange(float(n)))
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 1
    path.write_bytes(flipped)
    with pytest.raises(CheckpointError, match="do not match"):
        verify_checkpoint(path)


def _version_1_file(path: Path, payload: dict, block: int) -> Path:
    """A file as format version 1 wrote it: the tree digest of ``block``-byte blocks in the archive comment."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": 1, **payload}, buf)
    body = buf.getvalue()
    assert body[-22:-18] == b"PK\x05\x06" and body[-2:] == b"\0\0"  # the end record, no comment yet
    body = body[:-2] + store._TRAILER_SIZE.to_bytes(2, "little")
    path.write_bytes(body + store._TREE_TAG + _reference_digest(body, block).encode())
    return path


@pytest.mark.parametrize("block", [3, 64, 4 << 20])
def test_version_1_files_still_load(tmp_path: Path, monkeypatch, block: int) -> None:
    monkeypatch.setattr(store, "_BLOCK", block)  # version 1 hashed blocks of this size (4 MiB in every real file)
    payload = {"model": {"w": torch.arange(300.0)}, "epoch": 4}
    path = _version_1_file(tmp_path / "v1.pt", payload, block)
    assert verify_checkpoint(path) is True
    _same(load_checkpoint(path, require_digest=True), payload)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
        load_checkpoint(path)


def test_large_checkpoint_spans_many_reads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store, "_BLOCK", 4096)  # a 256 kB file: 64 reads when it is verified
    payload = {"model": {f"w{i}": torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(64)}}
    path = save_checkpoint(tmp_path / "big.pt", payload)
    data = path.read_bytes()
    assert data[-64:].decode() == _reference_digest(data[: -store._TRAILER_SIZE])
    _same(load_checkpoint(path), payload)


def test_foreign_format_tag_is_refused(tmp_path: Path) -> None:
    entries = {"model": {"w": torch.ones(2)}, "epoch": 1}
    for tag in ("something.else", 1):  # another program's tag; an older script's
        path = tmp_path / f"{tag}.pt"
        torch.save({"format": tag, "format_version": FORMAT_VERSION, **entries}, path)
        expected = rf"has the format tag {re.escape(repr(tag))}, not 'mixshare_layers\.checkpoint'.*convert"
        with pytest.raises(CheckpointError, match=expected) as info:
            load_checkpoint(path)
        assert str(path) in _one_line(info.value) and not info.value.damaged
        converted = load_checkpoint(convert_checkpoint(path, tmp_path / f"{tag}-converted.pt"))
        assert converted["source_format"] == tag and converted["epoch"] == 1
    torch.save(entries, tmp_path / "untagged.pt")  # no tag at all (other tools): plain weights, loaded unverified
    _same(load_checkpoint(tmp_path / "untagged.pt"), entries)


def _flip_in_tensor_data(data: bytes, value: torch.Tensor) -> bytes:
    raw = value.numpy().tobytes()
    at = data.index(raw) + len(raw) // 2
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_digest_mismatch_names_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    w = torch.arange(1000.0)
    save_checkpoint(path, {"model": {"w": w}, "epoch": 1})
    save_checkpoint(path, {"model": {"w": w + 1}, "epoch": 2}, keep_previous=True)
    prev = previous_checkpoint_path(path)
    assert prev.name == "checkpoint.prev.pt" and load_checkpoint(prev)["epoch"] == 1
    path.write_bytes(_flip_in_tensor_data(path.read_bytes(), w + 1))
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest") as info:
        load_checkpoint(path)
    message = _one_line(info.value)
    assert str(path) in message and str(prev) in message and info.value.damaged
    with pytest.raises(CheckpointError, match="do not match"):
        verify_checkpoint(path)
    # the damaged file is replaced but never kept as the fallback
    save_checkpoint(path, {"model": {"w": w + 2}, "epoch": 3}, keep_previous=True)
    assert load_checkpoint(prev)["epoch"] == 1 and load_checkpoint(path)["epoch"] == 3
    save_checkpoint(path, {"model": {"w": w + 3}, "epoch": 4}, keep_previous=True)
    assert load_checkpoint(prev)["epoch"] == 3 and load_checkpoint(path)["epoch"] == 4
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "checkpoint.prev.pt"}


def test_a_failed_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", {"epoch": 1})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2}, keep_previous=True)
    monkeypatch.undo()

    def not_an_archive(obj, f, *args, **kwargs):  # no zip end record: no place for the digest
        f.write(b"PK\x03\x04" + bytes(40))

    monkeypatch.setattr(torch, "save", not_an_archive)
    with pytest.raises(RuntimeError, match="without the expected end record"):
        save_checkpoint(path, {"epoch": 3}, keep_previous=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file, no .prev of a failed save


def test_previous_file_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", {"epoch": 1})

    def no_links(*args, **kwargs):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    save_checkpoint(path, {"epoch": 2}, keep_previous=True)
    assert load_checkpoint(previous_checkpoint_path(path)) == {"epoch": 1} and load_checkpoint(path) == {"epoch": 2}


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (argparse.Namespace(lr=0.1), "checkpoint['config'] has type argparse.Namespace"),
        (pathlib.Path("/x"), "checkpoint['config'] has type pathlib"),
        ({"lr": types.SimpleNamespace(a=1)}, "checkpoint['config']['lr'] has type types.SimpleNamespace"),
        ([1, {2, 3}], r"checkpoint\['config'\]\[1\] has type set"),
        ({1.5: "x"}, "has the key 1.5 of type float"),
        (torch.nn.Linear(2, 2), "has type torch.nn.modules.linear.Linear"),
    ],
)
def test_saving_anything_but_plain_values_is_refused(tmp_path: Path, value, where: str) -> None:
    with pytest.raises(TypeError, match=re.escape(where) if "\\" not in where else where):
        save_checkpoint(tmp_path / "ck.pt", {"config": value})
    assert not any(tmp_path.iterdir())


def test_plain_value_problem_is_exact_about_types() -> None:
    np = pytest.importorskip("numpy")
    assert plain_value_problem({"a": [1, 2.0, "x", None, True, b"y", 1j, torch.float16, torch.device("cpu")]}) is None
    assert plain_value_problem({"a": torch.Size([2, 3]), "p": torch.nn.Parameter(torch.ones(1))}) is None
    assert "numpy.float64" in plain_value_problem({"x": np.float64(1.0)})  # a float subclass: not plain
    loop: list = []
    loop.append(loop)
    assert "nested more than" in plain_value_problem(loop)
    with pytest.raises(ValueError, match="must not hold the keys"):
        save_checkpoint("unused.pt", {"format": 1})
    with pytest.raises(TypeError, match="dict of named entries"):
        save_checkpoint("unused.pt", [1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
def _case_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Damaged or refused files: name -> (path, a regex the error must match)."""
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.arange(100.0)}, "epoch": 1})
    data = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, content: bytes, pattern: str) -> None:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        cases[name] = (path, pattern)

    add("empty", b"", r"is empty \(0 bytes\)")
    add("truncated", data[: len(data) // 2], "truncated or damaged")
    add("random_bytes", os.urandom(4096), "not a zip archive")
    add("text", b"just some text\n", "not a zip archive")
    add("flipped_tensor_byte", _flip_in_tensor_data(data, torch.arange(100.0)), "do not match the SHA-256 digest")
    add("digest_cut_off", data[: -store._TRAILER_SIZE], "truncated or damaged|digest that is no longer there")
    add("plain_pickle", pickle.dumps({"model": 1}), "pickle stream")
    buf = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    cases["legacy_torch_format"] = (buf, "pickle stream")
    path = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    cases["namespace_config"] = (path, r"refused: it stores Python objects \(argparse\.Namespace\).*convert .*NEW\.pt")
    path = tmp_path / "code.pt"
    torch.save({"model": CodeRunner(tmp_path / "marker")}, path)
    cases["code_running_pickle"] = (path, r"refused: .*builtins\.exec.*only if you trust its source.*to_plain")
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1}, path)
    cases["newer_format_version"] = (path, f"format version {FORMAT_VERSION + 1} by a newer mixshare_layers")
    path = tmp_path / "foreign.pt"
    torch.save({"format": "something.else", "format_version": FORMAT_VERSION, "epoch": 1}, path)
    cases["foreign_format"] = (path, r"has the format tag 'something\.else', not 'mixshare_layers\.checkpoint'")
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    cases["not_a_dict"] = (path, "holds a list, not a dict")
    path = tmp_path / "no_digest_but_ours.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": 1}, path)
    cases["our_format_without_digest"] = (path, "digest that is no longer there")
    (tmp_path / "folder.pt").mkdir()
    cases["a_folder"] = (tmp_path / "folder.pt", "is a folder, not a file")
    cases["missing"] = (tmp_path / "missing.pt", "does not exist")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    cases["dangling_link"] = (tmp_path / "dangling.pt", "does not exist; check the path \\(it is a link")
    return cases


CASES = (
    "empty", "truncated", "random_bytes", "text", "flipped_tensor_byte", "digest_cut_off", "plain_pickle",
    "legacy_torch_format", "namespace_config", "code_running_pickle", "newer_format_version", "not_a_dict",
    "our_format_without_digest", "foreign_format", "a_folder", "missing", "dangling_link",
)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_files_get_a_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path, pattern = _case_files(tmp_path)[case]
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert str(path) in _one_line(info.value)
    assert not (tmp_path / "marker").exists()
    if case in ("missing", "dangling_link"):
        assert isinstance(info.value, CheckpointNotFoundError) and isinstance(info.value, FileNotFoundError)
    err = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact (DataLoader, multiprocessing)
    assert type(err) is type(info.value) and str(err) == str(info.value) and err.damaged == info.value.damaged


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", {"epoch": 1})
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: make opening it fail as it would for a user

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(store, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot be read \(Permission denied\); check the file's permissions"):
        load_checkpoint(path)


def test_require_digest(tmp_path: Path) -> None:
    torch.save({"epoch": 1}, tmp_path / "foreign.pt")
    assert load_checkpoint(tmp_path / "foreign.pt") == {"epoch": 1}  # plain values: loads, unverified
    assert verify_checkpoint(tmp_path / "foreign.pt") is False
    with pytest.raises(CheckpointError, match="carries no integrity digest"):
        load_checkpoint(tmp_path / "foreign.pt", require_digest=True)


def test_code_never_runs_whatever_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "code.pt"
    torch.save({"config": {"a": 1}, "model": {"w": CodeRunner(marker)}}, path)
    for env in ({}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "true"}):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=r"refused: .*builtins\.exec.*only if you trust its source"):
            convert_checkpoint(path, tmp_path / "converted.pt")
        assert not marker.exists()
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="both set"):
        load_checkpoint(path)
    assert not marker.exists() and not (tmp_path / "converted.pt").exists()


def test_classes_allow_listed_elsewhere_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # some other code in the process trusts Namespace
        with pytest.raises(CheckpointError, match=r"checkpoint\['args'\] has type argparse.Namespace"):
            load_checkpoint(path)


def test_old_torch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "ck.pt", {"epoch": 1})
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(CheckpointError, match=r"torch 2\.5\.1\+cu121 cannot load .*upgrade to torch >= 2\.6"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------
def test_convert_data_only_objects_without_running_code(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    src = tmp_path / "old.pt"
    old = {
        "state_dict": {"w": torch.ones(2)},
        "args": argparse.Namespace(lr=np.float64(0.1), root=pathlib.Path("/data"), sizes=np.arange(3)),
        "extra": types.SimpleNamespace(k=np.int64(4)),
        "format": 7,  # another program's own marker: kept as source_format
    }
    torch.save(old, src)
    with pytest.raises(CheckpointError, match="convert the file once"):
        load_checkpoint(src)
    dst = convert_checkpoint(src, tmp_path / "new.pt")
    assert verify_checkpoint(dst) is True
    new = load_checkpoint(dst)
    assert new["args"]["lr"] == 0.1 and type(new["args"]["lr"]) is float and new["args"]["root"] == "/data"
    assert torch.equal(new["args"]["sizes"], torch.arange(3)) and new["extra"] == {"k": 4}
    assert new["source_format"] == 7 and torch.equal(new["state_dict"]["w"], torch.ones(2))
    with pytest.raises(FileExistsError, match="exists"):
        convert_checkpoint(src, dst)
    with pytest.raises(ValueError, match="is the file being converted"):
        convert_checkpoint(dst, dst, overwrite=True)


def test_a_trusted_file_is_converted_by_its_owner(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    torch.save({"model": net, "epoch": 5}, tmp_path / "pickled_module.pt")  # a whole module: needs a full unpickle
    with pytest.raises(CheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*to_plain\(torch\.load\(PATH"):
        convert_checkpoint(tmp_path / "pickled_module.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    # what the message says to do, in the owner's code (the library itself never unpickles)
    out = save_checkpoint(tmp_path / "out.pt", to_plain(torch.load(tmp_path / "pickled_module.pt", weights_only=False)))
    new = load_checkpoint(out)
    assert new["epoch"] == 5 and torch.equal(new["model"]["weight"], net.weight.detach())


def test_to_plain() -> None:
    np = pytest.importorskip("numpy")
    assert to_plain({"a": (1, [np.float32(0.5)]), 3: {"b"}}) == {"a": (1, [0.5]), 3: ["b"]}
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a numpy array of Python objects"):
        to_plain({"x": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match=r"checkpoint\['f'\] has type function"):
        to_plain({"f": lambda: 0})


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mixshare_layers.checkpoint.__main__ import main

    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(3)}})
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    (tmp_path / "bad.pt").write_bytes(good.read_bytes()[:-1])
    assert main(["verify", str(good), str(tmp_path / "ns.pt"), str(tmp_path / "bad.pt")]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{good}: ok, digest verified, entries: model"]
    errors = err.splitlines()
    assert len(errors) == 2 and "ns.pt: refused" in errors[0] and "bad.pt: is damaged" in errors[1]
    assert main(["convert", str(tmp_path / "ns.pt"), str(tmp_path / "ns2.pt")]) == 0
    assert load_checkpoint(tmp_path / "ns2.pt") == {"args": {"a": 1}}
    assert main(["convert", str(tmp_path / "ns.pt"), str(tmp_path / "ns2.pt")]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "ns.pt")])
    assert info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
    # the real command: python -m, exit code and one line
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mixshare_layers.checkpoint", "verify", str(tmp_path / "bad.pt")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
