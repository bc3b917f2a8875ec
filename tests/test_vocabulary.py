"""One vocabulary: every option word in mixshare_layers.vocabulary, each idea under its own name, used everywhere."""

from __future__ import annotations

import ast
import enum
import importlib
import pathlib
import typing

import pytest
import torch

import mixshare_layers
from mixshare_layers import MIMOConfig, Unmixer, vocabulary
from mixshare_layers.functional import grid_mean, head_input

PACKAGE = pathlib.Path(mixshare_layers.__file__).parent
SOURCE = (PACKAGE / "vocabulary.py").read_text()

# the tuple of values of each Literal type
PAIRS = {
    "FeatureLayout": "FEATURE_LAYOUTS",
    "EncodingLayout": "ENCODING_LAYOUTS",
    "HeadPooling": "HEAD_POOLINGS",
    "EncoderInit": "ENCODER_INITS",
    "UnmixMode": "UNMIX_MODES",
    "UnmixReduction": "UNMIX_REDUCTIONS",
    "Backend": "BACKENDS",
    "EnsembleRule": "ENSEMBLE_RULES",
    "TemperatureMode": "TEMPERATURE_MODES",
    "AugmentTarget": "AUGMENT_TARGETS",
    "ProgressGranularity": "PROGRESS_GRANULARITIES",
    "ValueCheckMode": "VALUE_CHECK_MODES",
}

# the public names the tuples had before the vocabulary (they keep working, as the same objects)
OLD_NAMES = [
    ("mixshare_layers.layers.encoder", "ENCODER_INITS", "ENCODER_INITS"),
    ("mixshare_layers.layers.unmixer", "UNMIX_MODES", "UNMIX_MODES"),
    ("mixshare_layers.layers.unmixer", "POOLINGS", "UNMIX_REDUCTIONS"),
    ("mixshare_layers.layers.mixer", "ENCODING_LAYOUTS", "ENCODING_LAYOUTS"),
    ("mixshare_layers.adapters", "HEAD_POOLINGS", "HEAD_POOLINGS"),
    ("mixshare_layers.adapters.split", "HEAD_POOLINGS", "HEAD_POOLINGS"),
    ("mixshare_layers.functional", "FEATURE_LAYOUTS", "FEATURE_LAYOUTS"),
    ("mixshare_layers.functional.layout", "FEATURE_LAYOUTS", "FEATURE_LAYOUTS"),
    ("mixshare_layers.functional", "ENSEMBLE_RULES", "ENSEMBLE_RULES"),
    ("mixshare_layers.functional.ensemble", "ENSEMBLE_RULES", "ENSEMBLE_RULES"),
    ("mixshare_layers.functional.backend", "BACKENDS", "BACKENDS"),
    ("mixshare_layers._checks", "VALUE_CHECK_MODES", "VALUE_CHECK_MODES"),
    ("mixshare_layers.evaluation", "TEMPERATURE_MODES", "TEMPERATURE_MODES"),
    ("mixshare_layers.evaluation.temperature", "TEMPERATURE_MODES", "TEMPERATURE_MODES"),
]


@pytest.mark.parametrize(("literal", "values"), sorted(PAIRS.items()))
def test_each_tuple_holds_the_values_of_its_literal(literal, values):
    assert getattr(vocabulary, values) == typing.get_args(getattr(vocabulary, literal))
    assert {literal, values} <= set(vocabulary.__all__)


def test_every_name_is_exported_and_every_literal_has_a_one_line_docstring():
    assert sorted(vocabulary.__all__) == sorted([*PAIRS, *PAIRS.values()])
    body = ast.parse(SOURCE).body
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign) and node.targets[0].id in PAIRS:  # type: ignore[attr-defined]
            doc = body[i + 1]
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), node.targets[0].id  # type: ignore[attr-defined]
            assert "\n" not in doc.value.value.strip()


def test_distinct_ideas_have_distinct_words():
    # the head's pooling and the unmixing reduction were both called "pooling": no word is shared now
    assert not set(vocabulary.HEAD_POOLINGS) & set(vocabulary.UNMIX_REDUCTIONS)
    assert "UNMIX_REDUCTIONS" in (Unmixer.__doc__ or "") and "UnmixReduction" in (MIMOConfig.__doc__ or "")
    assert "HeadPooling" in (mixshare_layers.BackboneSplit.__doc__ or "")


@pytest.mark.parametrize(("module", "old", "new"), OLD_NAMES)
def test_the_old_public_names_are_the_vocabulary_tuples(module, old, new):
    mod = importlib.import_module(module)
    assert getattr(mod, old) is getattr(vocabulary, new)


def test_lightning_granularities_come_from_the_vocabulary():
    pytest.importorskip("lightning")
    from mixshare_layers.integrations import lightning

    assert lightning.PROGRESS_GRANULARITIES is vocabulary.PROGRESS_GRANULARITIES


def test_no_module_defines_its_own_copy_of_a_vocabulary_tuple():
    words = {getattr(vocabulary, name) for name in PAIRS.values()}
    copies = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "vocabulary.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Tuple):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if any(value == word for word in words):
                    copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert copies == []


class _Layout(str, enum.Enum):
    TOKENS = "tokens"


def test_plain_strings_and_string_enums_keep_working():
    unmixer = Unmixer("full", layout=_Layout.TOKENS, num_prefix_tokens=1, pooling="sum")
    assert unmixer.layout == "tokens" and type(unmixer.layout) is str  # stored as the vocabulary's own word
    assert MIMOConfig(unmix_pooling="sum").unmix_pooling == "sum"
    with pytest.raises(ValueError, match=r"pooling must be one of 'mean', 'sum', but got 'avg'"):
        Unmixer("full", pooling="avg")  # the head's word is not a reduction


def test_head_input():
    tokens = torch.randn(2, 1 + 6, 4)
    torch.testing.assert_close(head_input(tokens, "tokens", "avg", num_prefix_tokens=1), tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(head_input(tokens, "tokens", "token", num_prefix_tokens=1), tokens[:, 0])
    assert head_input(tokens, "tokens", "head") is tokens
    maps = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(head_input(maps, "channels_first"), grid_mean(maps, "channels_first"))
    with pytest.raises(ValueError, match=r"pooling must be one of 'avg', 'token', 'head', but got 'mean'"):
        head_input(maps, "channels_first", "mean")
    with pytest.raises(ValueError, match=r"pooling='token' reads the first token of a token sequence, but got"):
        head_input(maps, "channels_first", "token")
    with pytest.raises(ValueError, match=r"features must have shape \(B, N, C\), but got a tensor of shape"):
        head_input(maps, "tokens", "token")
    with pytest.raises(ValueError, match="no patch token after their 1 prefix tokens"):
        head_input(tokens[:, :1], "tokens", num_prefix_tokens=1)
