"""Mutation check: break the method on purpose, one rule at a time, and see whether the tests notice.

Each mutation is one exact text substitution (``old`` snippet -> ``new`` snippet) in one file of the library. It is
applied to a throwaway copy of the repository (``mixshare_layers/``, ``tests/``, ``benchmarks/``, ``examples/`` and
``pyproject.toml``, copied into a temporary folder; the working tree is never written), then a fast slice of the
test suite runs on that copy (``python -m pytest -x -q`` on :data:`DEFAULT_FILES`, ``PYTHONPATH`` = the copy, one
thread). A mutation is *caught* when a test fails. The snippet must occur exactly once in its file: when a refactor
moves the code, :func:`apply_mutation` raises :class:`SnippetError` instead of silently testing an unbroken copy.

Before the mutations, the unmutated copy runs the same slice and must pass (else every mutation would look caught),
and every snippet is checked against the working tree first, so a stale one stops the run before anything else.

Usage (from the repository root)::

    python -m benchmarks.mutations                          # every mutation, the default slice
    python -m benchmarks.mutations --only unmix-other-region owner-fixed
    python -m benchmarks.mutations --list                   # names, files and what each changes
    python -m benchmarks.mutations --out runs/mutations.json --markdown runs/mutations.md

The exit status is 1 when a mutation goes uncaught. ``tests/test_mutations.py`` runs a few cheap mutations against
single tests, and checks every snippet, in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from mixshare_layers.files import write_text

ROOT = Path(__file__).resolve().parents[1]

# what a copy holds (folders are copied without caches and stored results)
COPIED = ("mixshare_layers", "tests", "benchmarks", "examples", "pyproject.toml")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "results", "runs", "*.egg-info")

# the fast slice, cheapest and most specific first (with -x, the first failure ends a run)
DEFAULT_FILES = (
    "tests/test_method_rules.py",
    "tests/test_presets_errors.py",
    "tests/test_batcher_loss.py",
    "tests/test_mix_info.py",
    "tests/test_mixer.py",
    "tests/test_unmixer.py",
    "tests/test_multi_encoder.py",
    "tests/test_multi_head.py",
    "tests/test_wrapper.py",
    "tests/test_fold.py",
    "tests/test_differential.py",
)


@dataclass(frozen=True)
class Mutation:
    """One deliberate break of the method.

    Attributes:
        name: short identifier (used on the command line).
        path: the file to change, relative to the repository root.
        old: the exact snippet to replace; it must occur exactly once in the file.
        new: what replaces it.
        what: the rule it breaks, in words (for the table).
    """

    name: str
    path: str
    old: str
    new: str
    what: str


class SnippetError(ValueError):
    """A mutation's snippet does not occur exactly once in its file (the code moved: update the mutation)."""


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "unmix-other-region", "mixshare_layers/functional/unmixing.py",
        "    inside, outside = _pool_weights(info, strength, acc)  # (B, M)\n",
        "    inside, outside = (t.flip(1) for t in _pool_weights(info, strength, acc))  # (B, M)\n",
        "unmixing pools each member through the other member's region (M = 2)",
    ),
    Mutation(
        "cutmix-ramp-removed", "mixshare_layers/functional/mixing.py",
        "    return torch.where(p < start, torch.full_like(p, cutmix_prob), cutmix_prob * factor)\n",
        "    return torch.full_like(p, cutmix_prob)\n",
        "the CutMix probability no longer falls to 0 over the last 1/12 of training",
    ),
    Mutation(
        "input-repetition-off", "mixshare_layers/layers/batcher.py",
        "num_rep = round(self.input_repetition * n) if m > 1 else 0",
        "num_rep = 0",
        "no row gets the same image in every member (MixShare's 10 % input repetition ignored)",
    ),
    Mutation(
        "presets-aligned-encoders", "mixshare_layers/presets.py",
        '    encoder_init: str = "independent"\n',
        '    encoder_init: str = "aligned"\n',
        "the mimo / mixmo / unmix presets get aligned encoders",
    ),
    Mutation(
        "wrapper-aligned-encoders", "mixshare_layers/wrapper.py",
        "            init=cfg.encoder_init,\n",
        '            init="aligned",\n',
        "the wrapper gives every preset aligned encoders, whatever its encoder_init says",
    ),
    Mutation(
        "wrapper-mixing-values", "mixshare_layers/wrapper.py",
        "            alpha=cfg.alpha,\n            cutmix_prob=cfg.cutmix_prob,\n",
        "            alpha=1.0 if cfg.alpha == 2.0 else cfg.alpha,\n"
        "            cutmix_prob=0.9 if cfg.cutmix_prob == 0.5 else cfg.cutmix_prob,\n",
        "the wrapper's mixer draws λ from Beta(1, 1) and, where the preset says 0.5, uses CutMix with probability 0.9",
    ),
    Mutation(
        "mixmo-alpha-1-cutmix-0.9", "mixshare_layers/presets.py",
        '    "mixmo": _MIXMO,\n',
        '    "mixmo": _MIXMO.replace(alpha=1.0, cutmix_prob=0.9),\n',
        "the mixmo preset draws λ from Beta(1, 1) and uses CutMix with probability 0.9",
    ),
    Mutation(
        "loss-root-inverted", "mixshare_layers/functional/loss.py",
        "powered = ratios.clamp_min(0) ** (1.0 / rebalance_root)",
        "powered = ratios.clamp_min(0) ** rebalance_root",
        "loss weights from λ^r instead of λ^(1/r) (MixMo's r = 3)",
    ),
    Mutation(
        "loss-weights-uniform", "mixshare_layers/wrapper.py",
        "loss_weights=rebalanced_weights(info.ratios, self.config.rebalance_root)",
        "loss_weights=torch.ones_like(info.ratios)",
        "the wrapper's outputs carry weight 1 for every member, whatever the preset's r",
    ),
    Mutation(
        "loss-mean-over-members", "mixshare_layers/functional/loss.py",
        "return ce.mean(dim=0).sum() if b > 0 else ce.sum()",
        "return ce.mean() if b > 0 else ce.sum()",
        "the loss averages over members instead of summing the members' batch means",
    ),
    Mutation(
        "mix-scale-dropped", "mixshare_layers/functional/mixing.py",
        "    weights = info.masks_at(h, w, dtype=acc) * scale  # (B, M, H, W)\n",
        "    weights = info.masks_at(h, w, dtype=acc)  # (B, M, H, W)\n",
        "training mixes lose the factor M (sum m_i l_i instead of M sum m_i l_i)",
    ),
    Mutation(
        "fadeout-direction", "mixshare_layers/layers/unmixer.py",
        "return (p / self.fadeout_end).clamp(0.0, 1.0)",
        "return (1 - p / self.fadeout_end).clamp(0.0, 1.0)",
        "fadeout runs backwards: no unmixing at the start, full unmixing from fadeout_end on",
    ),
    Mutation(
        "fadeout-end", "mixshare_layers/presets.py",
        "    fadeout_end: float = 1.0 / 3.0\n",
        "    fadeout_end: float = 2.0 / 3.0\n",
        "fadeout ends at 2/3 of training instead of 1/3 (epoch 100 of 300)",
    ),
    Mutation(
        "partial-fraction", "mixshare_layers/layers/unmixer.py",
        "return math.ceil(self.fraction * channels)",
        "return math.ceil((1 - self.fraction) * channels)",
        "partial unmixing unmixes 75 % of the channels instead of 25 %",
    ),
    Mutation(
        "owner-fixed", "mixshare_layers/functional/mixing.py",
        "owner = torch.randint(m, (1,), device=device, **generator_kwargs(generator))",
        "owner = torch.randint(1, (1,), device=device, **generator_kwargs(generator))",
        "member 0 always owns the CutMix box (no shuffle of the roles)",
    ),
    Mutation(
        "box-side-linear", "mixshare_layers/functional/mixing.py",
        "half = (lam_owner.sqrt() * half_sizes).long()",
        "half = (lam_owner * half_sizes).long()",
        "the CutMix box side is λ times the map's instead of sqrt(λ) times",
    ),
    Mutation(
        "ratios-not-clipped", "mixshare_layers/functional/mixing.py",
        "cut_ratios = torch.lerp(cut_outside, owner_hot, area)",
        "cut_ratios = torch.lerp(cut_outside, owner_hot, lam_owner)",
        "λ stays the Dirichlet draw instead of the realised (clipped) box area",
    ),
    Mutation(
        "unmix-mask-nearest", "mixshare_layers/mix_info.py",
        "    return overlap.to(dtype) / native\n",
        "    return (2 * overlap >= native).to(dtype)\n",
        "masks brought to a coarser grid by nearest cell (>= half covered) instead of exact area coverage",
    ),
    Mutation(
        "eval-average", "mixshare_layers/layers/encoder.py",
        "return F.conv2d(x, self.kernels().sum(dim=0), bias,",
        "return F.conv2d(x, self.kernels().mean(dim=0), bias,",
        "test time averages the M encodings instead of summing them",
    ),
    Mutation(
        "fold-head-bias", "mixshare_layers/layers/head.py",
        "lin.bias.copy_(self.bias.reshape(-1))",
        "lin.bias.zero_()",
        "the folded (stacked) heads lose their biases",
    ),
    Mutation(
        "fold-encoder-sum", "mixshare_layers/layers/encoder.py",
        "conv.weight.copy_(self.kernels().sum(dim=0))",
        "conv.weight.copy_(self.kernels()[0])",
        "the folded encoder keeps the first kernel instead of the sum of the M kernels",
    ),
    Mutation(
        "head-init-default", "mixshare_layers/wrapper.py",
        "            copy_weights=self.pretrained,\n            reinit=parts.reinit,\n",
        "            copy_weights=self.pretrained,\n            reinit=None,\n",
        "the heads start from nn.Linear's default instead of the split's initialiser",
    ),
    Mutation(
        "aligned-encoders-reinitialised", "mixshare_layers/layers/encoder.py",
        '        if init == "independent":\n',
        '        if init != "colinear":\n',
        "aligned encoder copies are re-initialised independently",
    ),
    Mutation(
        "batch-repetition-ignored", "mixshare_layers/wrapper.py",
        "MIMOBatcher(self.num_subnetworks, batch_repetition, self.config.input_repetition",
        "MIMOBatcher(self.num_subnetworks, 1, self.config.input_repetition",
        "make_batcher ignores batch_repetition (each image once per member)",
    ),
    Mutation(
        "member-shuffles-shared", "mixshare_layers/layers/batcher.py",
        "keys = torch.rand(m, num_shuffled, device=device, **rng).argsort(dim=1)",
        "keys = torch.rand(1, num_shuffled, device=device, **rng).argsort(dim=1).expand(m, -1)",
        "every member gets the same permutation of the repeated batch",
    ),
    Mutation(
        "ensemble-rule-swapped", "mixshare_layers/functional/ensemble.py",
        '    if rule == "logit":\n',
        '    if rule == "prob":\n',
        'rule "prob" averages logits and rule "logit" averages probabilities',
    ),
)  # fmt: skip


def get_mutation(name: str) -> Mutation:
    """The mutation called ``name``; an unknown name raises a ``ValueError`` listing the valid ones."""
    for mutation in MUTATIONS:
        if mutation.name == name:
            return mutation
    valid = ", ".join(m.name for m in MUTATIONS)
    raise ValueError(f"unknown mutation {name!r}; valid names are {valid}")


def _count(mutation: Mutation, text: str, where: Path) -> None:
    count = text.count(mutation.old)
    if count != 1:
        raise SnippetError(
            f"mutation {mutation.name!r}: its snippet occurs {count} times in {where} (expected exactly once); the "
            f"code moved or changed, so update the mutation in benchmarks/mutations.py. Snippet: {mutation.old!r}"
        )


def check_snippets(root: Path = ROOT, mutations: Sequence[Mutation] = MUTATIONS) -> None:
    """Check, without writing anything, that every snippet occurs exactly once in ``root`` (raises SnippetError)."""
    for mutation in mutations:
        path = root / mutation.path
        if not path.is_file():
            raise SnippetError(f"mutation {mutation.name!r}: {path} does not exist")
        _count(mutation, path.read_text(encoding="utf-8"), path)


def copy_repo(dest: Path, root: Path = ROOT) -> Path:
    """Copy what the tests need (:data:`COPIED`) from ``root`` into the new folder ``dest``; returns ``dest``."""
    dest.mkdir(parents=True)
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_IGNORED)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest


def apply_mutation(mutation: Mutation, tree: Path) -> None:
    """Apply ``mutation`` to the copy ``tree`` (never the working tree); the file is replaced atomically."""
    if tree.resolve() == ROOT.resolve():
        raise ValueError(f"refusing to mutate the working tree {ROOT}: give a copy (copy_repo)")
    path = tree / mutation.path
    if not path.is_file():
        raise SnippetError(f"mutation {mutation.name!r}: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    _count(mutation, text, path)
    write_text(path, text.replace(mutation.old, mutation.new))


_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)
# pytest in the copy, after checking that the library it imports is the copy's own (an installed or editable one
# elsewhere would make every mutation look uncaught, and a failed import would make every one look caught)
_FOREIGN_LIBRARY = 97
_RUN_PYTEST = (
    "import pathlib, sys\n"
    "try:\n"
    "    import mixshare_layers\n"
    "except Exception as exc:\n"
    "    print(f'mixshare_layers does not import: {exc!r}')\n"
    f"    sys.exit({_FOREIGN_LIBRARY})\n"
    "where = pathlib.Path(mixshare_layers.__file__).resolve()\n"
    "if pathlib.Path.cwd().resolve() not in where.parents:\n"
    "    print(f'mixshare_layers imported from {where}')\n"
    f"    sys.exit({_FOREIGN_LIBRARY})\n"
    "import pytest\n"
    "sys.exit(pytest.main(sys.argv[1:]))\n"
)


def run_tests(tree: Path, files: Sequence[str] = DEFAULT_FILES, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``pytest -x -q`` on ``files`` in ``tree`` with ``PYTHONPATH`` = ``tree`` and one thread.

    Returns ``{"returncode", "failed" (the first failing test's id or ""), "seconds", "timed_out", "output"}``.
    Raises ``RuntimeError`` for a pytest usage or internal error, when no test was collected, or when the copy
    imports a ``mixshare_layers`` other than its own.
    """
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    cmd = [sys.executable, "-c", _RUN_PYTEST, "-x", "-q", "-p", "no:cacheprovider", "-rfE", *files]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"returncode": None, "failed": "", "seconds": time.perf_counter() - start, "timed_out": True,
                "output": out[-4000:]}  # fmt: skip
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == _FOREIGN_LIBRARY:
        raise RuntimeError(f"the copy in {tree} does not run its own mixshare_layers: {output.strip()[-500:]}")
    if proc.returncode not in (0, 1, 2):
        raise RuntimeError(f"pytest exited with status {proc.returncode} in {tree}:\n{output[-4000:]}")
    found = _FAILURE.search(output)
    failed = found.group(2) if found else ""
    if proc.returncode == 2 and not failed:
        errors = re.search(r"^ERROR collecting (\S+)", output, re.M) or re.search(r"^E\s+(.+)$", output, re.M)
        failed = f"collection: {errors.group(1)}" if errors else "collection error"
    return {"returncode": proc.returncode, "failed": failed, "seconds": seconds, "timed_out": False,
            "output": output[-4000:]}  # fmt: skip


def check_mutation(mutation: Mutation, files: Sequence[str] = DEFAULT_FILES, timeout: float = 900.0) -> dict[str, Any]:
    """Apply ``mutation`` to a fresh copy, run the tests, and say whether (and by which test) it was caught."""
    with tempfile.TemporaryDirectory(prefix="mixshare-mutation-") as tmp:
        tree = copy_repo(Path(tmp) / "repo")
        apply_mutation(mutation, tree)
        run = run_tests(tree, files, timeout)
    caught = run["returncode"] in (1, 2)
    by = run["failed"] if caught else ("timed out" if run["timed_out"] else "")
    return {"name": mutation.name, "file": mutation.path, "what": mutation.what, "caught": caught, "by": by,
            "seconds": round(run["seconds"], 1), "output": run["output"]}  # fmt: skip


def check_baseline(files: Sequence[str] = DEFAULT_FILES, timeout: float = 900.0) -> dict[str, Any]:
    """Run the slice on an unmutated copy; raises ``RuntimeError`` unless it passes."""
    with tempfile.TemporaryDirectory(prefix="mixshare-mutation-") as tmp:
        run = run_tests(copy_repo(Path(tmp) / "repo"), files, timeout)
    if run["returncode"] != 0:
        raise RuntimeError(
            f"the unmutated copy fails its tests ({run['failed'] or 'timed out'}): fix that first\n{run['output']}"
        )
    return {"seconds": round(run["seconds"], 1)}


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (one row per mutation)."""
    lines = ["| mutation | file | what it changes | caught | by | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        by = f"`{r['by']}`" if r["by"] else "–"
        lines.append(f"| `{r['name']}` | `{r['file']}` | {r['what']} | {'yes' if r['caught'] else '**no**'} | {by} "
                     f"| {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations (default: all)")
    p.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files (or ids) of the slice")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated copy first")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.path:42s} {m.what}")
        return 0
    mutations = [get_mutation(n) for n in args.only] if args.only else list(MUTATIONS)
    check_snippets(ROOT, mutations)  # a stale snippet stops the run before any test
    started = time.perf_counter()
    if not args.skip_baseline:
        base = check_baseline(args.files, args.timeout)
        print(f"[mutations] unmutated copy passes the slice in {base['seconds']:.0f} s", flush=True)
    results = []
    for i, mutation in enumerate(mutations, 1):
        r = check_mutation(mutation, args.files, args.timeout)
        results.append(r)
        verdict = f"caught by {r['by']}" if r["caught"] else f"NOT CAUGHT {r['by']}".strip()
        print(f"[mutations] {i}/{len(mutations)} {mutation.name}: {verdict} ({r['seconds']:.0f} s)", flush=True)
    text = markdown_table(results)
    uncaught = [r["name"] for r in results if not r["caught"]]
    print(f"\n{text}\n{len(results) - len(uncaught)} of {len(results)} caught; {date.today()}, python "
          f"{sys.version.split()[0]}, {time.perf_counter() - started:.0f} s in all", flush=True)  # fmt: skip
    if args.out:
        rows = [{k: v for k, v in r.items() if k != "output"} for r in results]
        write_text(args.out, json.dumps({"files": args.files, "results": rows}, indent=1) + "\n")
    if args.markdown:
        write_text(args.markdown, text)
    if uncaught:
        print(f"uncaught: {', '.join(uncaught)}", file=sys.stderr)
    return 1 if uncaught else 0


if __name__ == "__main__":
    sys.exit(main())
