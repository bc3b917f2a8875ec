"""``python -m mixshare_layers.checkpoint verify FILE...`` and ``... convert [--trusted] SRC DST``.

``verify`` loads each file the safe way (digest first, ``weights_only=True``) and prints one line per file;
``convert`` rewrites a file that the loader refuses (see :mod:`mixshare_layers.checkpoint.convert`). Errors are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from .convert import convert_checkpoint
from .store import CheckpointError, load_checkpoint, verify_checkpoint

PROG = "python -m mixshare_layers.checkpoint"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Check or convert checkpoint files (see the mixshare_layers.checkpoint docs).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    verify = sub.add_parser("verify", help="check the digest and load each file safely; one line per file")
    verify.add_argument("files", nargs="+", metavar="FILE")
    convert = sub.add_parser("convert", help="rewrite a refused file as a plain checkpoint with a digest")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument(
        "--trusted",
        action="store_true",
        help="unpickle SRC completely, which RUNS any code it holds: only for a file you made or whose source you "
        "trust",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _describe(checkpoint: dict[str, Any]) -> str:
    tensors, nbytes = 0, 0
    stack: list[Any] = [checkpoint]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            tensors += 1
            nbytes += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return f"{tensors} tensors ({nbytes / 1e6:.1f} MB), entries: {', '.join(map(str, checkpoint)) or 'none'}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 when a file failed)."""
    args = _parser().parse_args(argv)
    failed = False
    if args.command == "verify":
        for path in args.files:
            try:
                verified = verify_checkpoint(path)
                checkpoint = load_checkpoint(path)
            except CheckpointError as err:
                print(f"error: {err}", file=sys.stderr)
                failed = True
                continue
            state = "digest verified" if verified else "no digest (not written by save_checkpoint): unverified"
            print(f"{path}: ok, {state}, {_describe(checkpoint)}")
        return 2 if failed else 0
    try:
        out = convert_checkpoint(args.src, args.dst, trusted=args.trusted, overwrite=args.overwrite, log=print)
    except (CheckpointError, FileExistsError, TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (plain values, with a digest): load it with mixshare_layers.checkpoint.load_checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
