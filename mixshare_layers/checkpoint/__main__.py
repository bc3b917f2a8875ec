"""``python -m mixshare_layers.checkpoint verify FILE...`` and ``... convert [--trusted] [--overwrite] SRC DST``.

``verify`` loads each file the safe way and prints one line per file; ``convert`` rewrites a file the loader refuses
(:func:`~mixshare_layers.checkpoint.convert_checkpoint`). Errors are one line on stderr, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from .convert import convert_checkpoint
from .store import CheckpointError, load_checkpoint, verify_checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mixshare_layers.checkpoint", description="Check or convert checkpoint files.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("verify", help="check the digest and load each file safely").add_argument("files", nargs="+")
    convert = sub.add_parser("convert", help="rewrite a refused file as a plain checkpoint with a digest")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument("--trusted", action="store_true", help="unpickle SRC completely, which RUNS any code it holds")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 when a file failed)."""
    args = _parser().parse_args(argv)
    failed = False
    for path in args.files if args.command == "verify" else ():
        try:
            verified, checkpoint = verify_checkpoint(path), load_checkpoint(path)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            failed = True
            continue
        tensors = _tensors(checkpoint)
        size = sum(t.numel() * t.element_size() for t in tensors) / 1e6
        state = "digest verified" if verified else "no digest (not written by save_checkpoint): unverified"
        entries = ", ".join(checkpoint) or "none"
        print(f"{path}: ok, {state}, {len(tensors)} tensors ({size:.1f} MB), entries: {entries}")
    if args.command == "convert":
        try:
            out = convert_checkpoint(args.src, args.dst, trusted=args.trusted, overwrite=args.overwrite, log=print)
        except (CheckpointError, FileExistsError, TypeError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out} (plain values, with a digest): load it with mixshare_layers.checkpoint.load_checkpoint")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
