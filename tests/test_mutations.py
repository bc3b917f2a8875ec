"""The CI slice of the mutation check (``benchmarks/mutations.py``): every snippet still matches, a few cheap
mutations are caught by the test written for them, and bad names or stale snippets fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import mutations

RULES = "tests/test_method_rules.py"

# the cheapest mutations, each run against the one test that should catch it
CHEAP = {
    "unmix-other-region": f"{RULES}::test_lockstep_with_cutmix_and_unmixing[unmix-0.0]",
    "presets-aligned-encoders": f"{RULES}::test_the_library_presets_match_the_reference_field_by_field",
    # the earlier suite missed this one: the lock-step feeds the reference's mixes, so the wrapper's sampler and the
    # values it gets from the preset never entered it
    "wrapper-mixing-values": f"{RULES}::test_the_wrappers_sampler_draws_like_the_reference[mixmo]",
}


def test_every_snippet_matches_exactly_once_in_this_tree():
    """A refactor that moves the code a mutation breaks fails here, not silently in the mutation run."""
    mutations.check_snippets()
    names = [m.name for m in mutations.MUTATIONS]
    assert len(names) == len(set(names)) >= 15
    assert all(m.old != m.new and m.what for m in mutations.MUTATIONS)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_cheap_mutations_are_caught(name):
    mutation = mutations.get_mutation(name)
    original = (mutations.ROOT / mutation.path).read_text(encoding="utf-8")
    result = mutations.check_mutation(mutation, files=[CHEAP[name]], timeout=300)
    assert result["caught"], result["output"]
    assert result["by"].startswith(CHEAP[name].split("[")[0]), result["by"]
    assert (mutations.ROOT / mutation.path).read_text(encoding="utf-8") == original  # the working tree untouched


def test_an_unknown_mutation_name_is_refused():
    with pytest.raises(ValueError, match="unknown mutation 'no-such-break'; valid names are unmix-other-region, "):
        mutations.get_mutation("no-such-break")


def _tree(tmp_path: Path, text: str) -> Path:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(text, encoding="utf-8")
    return tmp_path


def test_a_snippet_that_no_longer_matches_raises(tmp_path):
    tree = _tree(tmp_path, "x = 1\ny = 2\ny = 2\n")
    stale = mutations.Mutation("stale", "pkg/mod.py", "z = 3", "z = 4", "a snippet that moved away")
    with pytest.raises(mutations.SnippetError, match=r"mutation 'stale': its snippet occurs 0 times in .*mod\.py"):
        mutations.apply_mutation(stale, tree)
    twice = mutations.Mutation("twice", "pkg/mod.py", "y = 2", "y = 5", "an ambiguous snippet")
    with pytest.raises(mutations.SnippetError, match="occurs 2 times"):
        mutations.apply_mutation(twice, tree)
    with pytest.raises(mutations.SnippetError, match="occurs 0 times"):
        mutations.check_snippets(tree, [stale])
    missing = mutations.Mutation("missing", "pkg/gone.py", "x", "y", "a file that moved")
    with pytest.raises(mutations.SnippetError, match=r"mutation 'missing': .*gone\.py does not exist"):
        mutations.apply_mutation(missing, tree)
    assert (tree / "pkg" / "mod.py").read_text(encoding="utf-8") == "x = 1\ny = 2\ny = 2\n"  # nothing written
    ok = mutations.Mutation("ok", "pkg/mod.py", "x = 1", "x = 7", "a snippet that matches once")
    mutations.apply_mutation(ok, tree)
    assert (tree / "pkg" / "mod.py").read_text(encoding="utf-8") == "x = 7\ny = 2\ny = 2\n"


def test_a_copy_that_runs_another_library_is_refused(tmp_path):
    """Tests run against any other mixshare_layers (or none) would make the mutations look uncaught (or caught)."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="does not run its own mixshare_layers"):
        mutations.run_tests(tmp_path, ["tests/test_nothing.py"], timeout=300)


def test_the_working_tree_is_never_mutated():
    with pytest.raises(ValueError, match="refusing to mutate the working tree"):
        mutations.apply_mutation(mutations.MUTATIONS[0], mutations.ROOT)
