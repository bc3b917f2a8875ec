"""The torchvision adapter: every classification model of ``torchvision.models``.

torchvision has no uniform feature API, so each model class gets its split here, built from the model's own
modules (torchvision's ``Sequential`` subclasses such as ``Conv2dNormActivation`` are split with ``list(...)``:
slicing them raises ``TypeError``):

| class | encoder | features | pooling | head |
|---|---|---|---|---|
| ResNet / ResNeXt / WRN | ``conv1`` | ``(B, D, h, w)`` | average | ``fc`` |
| RegNet | ``stem[0]`` | ``(B, D, h, w)`` | average | ``fc`` |
| EfficientNet v1 / v2 | ``features[0][0]`` | ``(B, D, h, w)`` | average | dropout + linear |
| MobileNet v2 / v3 | ``features[0][0]`` | ``(B, D, h, w)`` | average | dropout + linear / MLP |
| MNASNet | ``layers[0]`` | ``(B, D, h, w)`` | average | dropout + linear |
| ConvNeXt | ``features[0][0]`` | ``(B, D, h, w)`` | average | LayerNorm + linear |
| DenseNet | ``features.conv0`` | ``(B, D, h, w)`` | average | ``classifier`` |
| ShuffleNet v2 | ``conv1[0]`` | ``(B, D, h, w)`` | average | ``fc`` |
| GoogLeNet / Inception v3 | the first ``conv`` | ``(B, D, h, w)`` | average | dropout + ``fc`` |
| MaxViT | ``stem[0][0]`` | ``(B, D, h, w)`` | average | LayerNorm + MLP |
| Swin v1 / v2 | ``features[0][0]`` | ``(B, h, w, D)`` | average | ``head`` |
| VisionTransformer | ``conv_proj`` (or its conv stem's first conv) | tokens, 1 prefix | class token | ``heads`` |
| VGG / AlexNet | ``features[0]`` | ``(B, D, h, w)`` | the head's own | pool + flatten + MLP |
| SqueezeNet | ``features[0]`` | ``(B, D, h, w)`` | the head's own | 1x1 conv + ReLU + pool |

GoogLeNet and Inception v3 lose their auxiliary classifiers (they only run in training, on intermediate maps, and
are not part of the network's prediction); their ``transform_input`` becomes the split's ``preprocess``. VGG,
AlexNet and SqueezeNet heads read the spatial map itself (flattened into an MLP, or a 1x1-conv classifier before the
pooling), and the ViT head reads the class token: those keep the heads' own pooling, so mixing works but unmixing
(the presets that pool per member through the masks) is refused with the reason.

Every split is checked against the model on a probe batch before it is returned. Its ``reinit`` is torchvision's
own initialisation of the model's family (:data:`~mixshare_layers.adapters.inits.TORCHVISION_INITS`), so the copies
a wrapper draws start as the model's own first layer and head do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .check import check_split, probe_images
from .inits import TORCHVISION_INITS
from .split import BackboneSplit, UnsupportedBackboneError

__all__ = ["is_torchvision_model", "split_torchvision", "torchvision_family"]

HOW_TO = (
    "Give the split yourself: MIMOWrapper(split=BackboneSplit(encoder=..., core=..., classifier=..., layout=..., "
    "pooling=...), num_subnetworks=...) (docs: how-to/custom-backbone), or register an adapter for this class with "
    "mixshare_layers.adapters.register_adapter(cls, fn)."
)


def is_torchvision_model(model: nn.Module) -> bool:
    """Whether ``model``'s class (or one of its bases) is defined in ``torchvision.models``."""
    return any(cls.__module__.startswith("torchvision.models.") for cls in type(model).__mro__)


def _seq(*parts: nn.Module | list[nn.Module]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for part in parts:
        modules.extend(part if isinstance(part, list) else [part])
    return nn.Sequential(*modules)


def _rest(sequential: nn.Module) -> list[nn.Module]:
    """The children of a (torchvision) Sequential after its first one."""
    return list(sequential.children())[1:]


class _Inception(nn.Module):
    """torchvision GoogLeNet / Inception v3's ``BasicConv2d`` without its convolution: BatchNorm then ReLU."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu_(self.bn(x))


class InceptionInputTransform(nn.Module):
    """torchvision's ``transform_input`` of GoogLeNet / Inception v3 (ImageNet normalisation to ``[-1, 1]``), on
    any leading dims: channel ``c`` becomes ``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``, with the same float
    operations as torchvision."""

    def forward(self, x: Tensor) -> Tensor:
        c0 = x.narrow(-3, 0, 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        c1 = x.narrow(-3, 1, 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        c2 = x.narrow(-3, 2, 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((c0, c1, c2), dim=-3)


class ViTCore(nn.Module):
    """torchvision ``VisionTransformer`` from its patch embedding on: the rest of a convolutional stem if it has one,
    then flatten the ``(B, D, h, w)`` grid row-major, prepend the class token, run the encoder (positional
    embedding, blocks, final norm): ``(B, 1 + h w, D)``."""

    def __init__(self, class_token: nn.Parameter, encoder: nn.Module, stem: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.class_token = class_token
        self.encoder = encoder

    def forward(self, grid: Tensor) -> Tensor:
        if self.stem is not None:
            grid = self.stem(grid)
        tokens = grid.flatten(2).transpose(1, 2)  # (B, h w, D), as VisionTransformer._process_input
        cls = self.class_token.expand(tokens.shape[0], -1, -1)
        return self.encoder(torch.cat([cls, tokens], dim=1))


def _resnet(m: Any) -> BackboneSplit:
    core = _seq(m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return BackboneSplit(encoder=m.conv1, core=core, classifier=m.fc)


def _regnet(m: Any) -> BackboneSplit:
    return BackboneSplit(encoder=m.stem[0], core=_seq(_rest(m.stem), m.trunk_output), classifier=m.fc)


def _features_classifier(m: Any) -> BackboneSplit:
    """EfficientNet, MobileNet v2 / v3: ``features`` (a conv-norm-act stem first), average pool, ``classifier``."""
    core = _seq(_rest(m.features[0]), _rest(m.features))
    return BackboneSplit(encoder=m.features[0][0], core=core, classifier=m.classifier)


def _mnasnet(m: Any) -> BackboneSplit:
    return BackboneSplit(encoder=m.layers[0], core=_seq(_rest(m.layers)), classifier=m.classifier)


def _convnext(m: Any) -> BackboneSplit:
    core = _seq(_rest(m.features[0]), _rest(m.features))
    width = m.classifier[-1].in_features  # the classifier's LayerNorm2d reads the pooled (B, D, 1, 1) map
    head = nn.Sequential(nn.Unflatten(1, (width, 1, 1)), m.classifier)
    return BackboneSplit(encoder=m.features[0][0], core=core, classifier=head)


def _densenet(m: Any) -> BackboneSplit:
    core = _seq(_rest(m.features), nn.ReLU(inplace=True))  # DenseNet.forward applies F.relu after its features
    return BackboneSplit(encoder=m.features[0], core=core, classifier=m.classifier)


def _shufflenet(m: Any) -> BackboneSplit:
    core = _seq(_rest(m.conv1), m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5)
    return BackboneSplit(encoder=m.conv1[0], core=core, classifier=m.fc)


def _squeezenet(m: Any) -> BackboneSplit:
    head = nn.Sequential(m.classifier, nn.Flatten(1))  # dropout, 1x1 conv to the classes, ReLU, average pool
    return BackboneSplit(encoder=m.features[0], core=_seq(_rest(m.features)), classifier=head, pooling="head")


def _vgg(m: Any) -> BackboneSplit:  # VGG and AlexNet
    head = nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)
    return BackboneSplit(encoder=m.features[0], core=_seq(_rest(m.features)), classifier=head, pooling="head")


def _googlenet(m: Any) -> BackboneSplit:
    names = ["maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3", "inception4a"]
    names += ["inception4b", "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"]
    core = _seq(_Inception(m.conv1.bn), [m.get_submodule(n) for n in names])
    head = nn.Sequential(m.dropout, m.fc)
    pre = InceptionInputTransform() if m.transform_input else None
    return BackboneSplit(encoder=m.conv1.conv, core=core, classifier=head, preprocess=pre)


def _inception3(m: Any) -> BackboneSplit:
    names = ["Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b"]
    names += ["Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a"]
    names += ["Mixed_7b", "Mixed_7c"]
    core = _seq(_Inception(m.Conv2d_1a_3x3.bn), [m.get_submodule(n) for n in names])
    head = nn.Sequential(m.dropout, m.fc)
    pre = InceptionInputTransform() if m.transform_input else None
    return BackboneSplit(encoder=m.Conv2d_1a_3x3.conv, core=core, classifier=head, preprocess=pre)


def _maxvit(m: Any) -> BackboneSplit:
    core = _seq(_rest(m.stem[0]), _rest(m.stem), list(m.blocks))
    head = nn.Sequential(*list(m.classifier.children())[2:])  # after its average pool and flatten
    return BackboneSplit(encoder=m.stem[0][0], core=core, classifier=head)


def _swin(m: Any) -> BackboneSplit:
    core = _seq(_rest(m.features[0]), _rest(m.features), m.norm)  # (B, h, w, D): Swin keeps the channels last
    return BackboneSplit(encoder=m.features[0][0], core=core, classifier=m.head, layout="channels_last")


def _vit(m: Any) -> BackboneSplit:
    encoder: Any = m.conv_proj
    stem = None
    if isinstance(encoder, nn.Sequential):  # a convolutional stem (conv_stem_configs): its first conv sees the image
        layers = _rest(encoder[0]) + _rest(encoder)
        encoder, stem = encoder[0][0], nn.Sequential(*layers)  # type: ignore[index]
    return BackboneSplit(
        encoder=encoder,
        core=ViTCore(m.class_token, m.encoder, stem),
        classifier=m.heads,
        layout="tokens",
        num_prefix_tokens=1,
        pooling="token",
    )


def _table() -> list[tuple[type, Callable[[Any], BackboneSplit], str]]:
    """Each class, its split, and its family (its initialiser in
    :data:`~mixshare_layers.adapters.inits.TORCHVISION_INITS`)."""
    from torchvision import models as tvm

    return [
        (tvm.ResNet, _resnet, "resnet"),
        (tvm.RegNet, _regnet, "regnet"),
        (tvm.EfficientNet, _features_classifier, "efficientnet"),
        (tvm.MobileNetV2, _features_classifier, "mobilenet"),
        (tvm.MobileNetV3, _features_classifier, "mobilenet"),
        (tvm.MNASNet, _mnasnet, "mnasnet"),
        (tvm.ConvNeXt, _convnext, "convnext"),
        (tvm.DenseNet, _densenet, "densenet"),
        (tvm.ShuffleNetV2, _shufflenet, "shufflenet"),
        (tvm.SqueezeNet, _squeezenet, "squeezenet"),
        (tvm.VGG, _vgg, "vgg"),
        (tvm.AlexNet, _vgg, "alexnet"),
        (tvm.GoogLeNet, _googlenet, "googlenet"),
        (tvm.Inception3, _inception3, "inception"),
        (tvm.MaxVit, _maxvit, "maxvit"),
        (tvm.SwinTransformer, _swin, "swin"),
        (tvm.VisionTransformer, _vit, "vit"),
    ]


def torchvision_family(model: nn.Module) -> str | None:
    """The family of a ``torchvision.models`` classifier (a key of
    :data:`~mixshare_layers.adapters.inits.TORCHVISION_INITS`), ``None`` for a class the adapter does not know.

    Example:
        >>> import torchvision
        >>> torchvision_family(torchvision.models.mobilenet_v3_small())
        'mobilenet'
    """
    return next((family for cls, _, family in _table() if isinstance(model, cls)), None)


def _probe_sizes(model: nn.Module) -> list[int | tuple[int, int]]:
    fixed = getattr(model, "image_size", None)  # VisionTransformer
    if isinstance(fixed, int):
        return [fixed]
    return [64, 96, 128, 160, 224]


def split_torchvision(model: nn.Module) -> BackboneSplit:
    """Split a ``torchvision.models`` classification model (table in the module docstring).

    Args:
        model: an instance of one of the classes above (or of a subclass), possibly modified (a new ``fc``, a
            CIFAR stem...): the split is checked against the model's own forward on a probe batch.

    Raises:
        UnsupportedBackboneError: an unknown class, or a split that does not reproduce the model (the reason and
            the way out).

    Example:
        >>> import torchvision
        >>> split = split_torchvision(torchvision.models.mobilenet_v3_small(num_classes=10))
        >>> split.encoder
        Conv2d(3, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
        >>> [type(layer).__name__ for layer in split.head]
        ['Linear', 'Hardswish', 'Dropout', 'Linear']
    """
    name = type(model).__name__
    for cls, make, family in _table():
        if isinstance(model, cls):
            try:
                split = make(model)._replace(reinit=TORCHVISION_INITS[family])
            except (AttributeError, IndexError, TypeError) as exc:
                raise UnsupportedBackboneError(
                    f"{name} does not have the layout of torchvision's {cls.__name__} ({exc}). " + HOW_TO
                ) from exc
            encoder = split.encoder
            channels = encoder.in_channels if isinstance(encoder, nn.Conv2d) else 3
            try:
                images, _ = probe_images(model, _probe_sizes(model), channels)
                check_split(model, split, images)
            except ValueError as exc:
                raise UnsupportedBackboneError(f"{name}: {exc}. " + HOW_TO) from exc
            return split.validate()
    raise UnsupportedBackboneError(f"{name} is not a torchvision classification model known here. " + HOW_TO)
