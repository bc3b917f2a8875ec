"""``python -m mixshare_layers.checkpoint verify FILE...`` (load each file safely) and ``convert [--overwrite] SRC DST``
(:func:`~mixshare_layers.checkpoint.convert_checkpoint`); one line per file, errors on stderr with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .convert import convert_checkpoint
from .store import CheckpointError, load_checkpoint, verify_checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 when a file failed)."""
    parser = _Parser(prog="python -m mixshare_layers.checkpoint", description="Check or convert checkpoint files.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("verify", help="check the digest and load each file safely").add_argument("files", nargs="+")
    convert = sub.add_parser("convert", help="rewrite a refused file as a plain checkpoint with a digest")
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args, code = parser.parse_args(argv), 0
    for path in args.files if args.command == "verify" else ():
        try:
            verified, checkpoint = verify_checkpoint(path), load_checkpoint(path)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            code = 2
            continue
        state = "digest verified" if verified else "no digest (not written by save_checkpoint): unverified"
        print(f"{path}: ok, {state}, entries: {', '.join(checkpoint) or 'none'}")
    if args.command == "convert":
        try:
            out = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite, log=print)
        except (CheckpointError, FileExistsError, TypeError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out} (plain values, with a digest): load it with mixshare_layers.checkpoint.load_checkpoint")
    return code


if __name__ == "__main__":
    sys.exit(main())
