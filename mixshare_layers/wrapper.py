"""``MIMOWrapper``: any CNN backbone as a MIMO / MixMo / MixShare network."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_num_subnetworks, check_real
from .adapters import BackboneSplit, split_backbone
from .batcher import MIMOBatcher
from .functional.ensemble import ENSEMBLE_RULES, ensemble_probs, to_estimator_major
from .loss import MIMOLoss
from .mix_info import MixInfo
from .mixer import CutMixMixer
from .multi_encoder import MultiEncoder
from .multi_head import MultiHead
from .presets import PRESETS, MIMOConfig, get_preset
from .unmixer import Unmixer

__all__ = ["MIMOOutput", "MIMOWrapper"]


class MIMOOutput(NamedTuple):
    """What a training forward returns.

    Attributes:
        logits: ``(B, M, K)``; row ``i`` of sample ``b`` is subnetwork ``i``'s prediction for input ``i``.
        mix_info: the :class:`~mixshare_layers.MixInfo` of the batch (λ for the loss, masks for analysis).

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2, preset="mixmo")
        >>> logits, info = model(torch.randn(3, 2, 3, 32, 32))
        >>> logits.shape, info.ratios.shape
        (torch.Size([3, 2, 10]), torch.Size([3, 2]))
    """

    logits: Tensor
    mix_info: MixInfo


class MIMOWrapper(nn.Module):
    """Turn a classification backbone into an M-subnetwork MIMO network.

    The backbone is split into encoder / core / classifier (:mod:`mixshare_layers.adapters`). The encoder becomes a
    :class:`~mixshare_layers.MultiEncoder`, a :class:`~mixshare_layers.CutMixMixer` mixes the M encodings, the core
    is shared, an :class:`~mixshare_layers.Unmixer` pools the final maps per subnetwork and a
    :class:`~mixshare_layers.MultiHead` classifies.

    Args:
        backbone: the network to wrap (ignored parts: its global pooling). May be ``None`` when ``split`` is a
            :class:`~mixshare_layers.BackboneSplit`.
        num_subnetworks: M.
        preset: one of ``"mimo"``, ``"mixmo"``, ``"unmix"``, ``"unmix-aligned"``, ``"mixshare"``,
            ``"mixshare-partial"`` (table in :mod:`mixshare_layers.presets`).
        split: a :class:`~mixshare_layers.BackboneSplit`, or a function of the backbone returning one.
        pretrained: keep the backbone's weights as the starting point: aligned/colinear encoder copies are scaled
            to sum to the original conv and every head is a copy of the classifier, so that in eval mode every head
            gives exactly the backbone's logits at initialisation. Otherwise the M heads are initialised
            independently with the split's ``reinit`` (the backbone's own initialiser: MixMo's truncated He-normal
            with zero bias for the library's WRN; ``nn.Linear``'s default when the split has none), and encoders
            follow ``encoder_init``.
        backend: implementation of the masked ops (mixing, unmixing): ``"auto"`` (fused Triton kernels for CUDA
            tensors when triton imports, else torch), ``"torch"`` or ``"triton"``; ``None`` reads
            ``MIXSHARE_BACKEND`` (see :mod:`mixshare_layers.functional.backend`).
        **overrides: any field of :class:`~mixshare_layers.MIMOConfig` (e.g. ``alpha=1.0``, ``unmix_mode="full"``).

    Shape:
        - Training: ``(B, M, C, H, W)`` -> :class:`MIMOOutput` with logits ``(B, M, K)``.
        - Eval: ``(B, C, H, W)`` -> logits ``(B, M, K)``, from one pass of the core (the same image fed to every
          encoder, encodings summed); ``(B, M, C, H, W)`` is accepted too (M different images, summed encodings).

    Example:
        >>> from mixshare_layers.models import wide_resnet
        >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), num_subnetworks=2, preset="mixshare")
        >>> out = model(torch.randn(4, 2, 3, 32, 32))
        >>> out.logits.shape
        torch.Size([4, 2, 10])
        >>> _ = model.eval()
        >>> model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 2, 10])
    """

    progress: Tensor

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_subnetworks: int = 2,
        preset: str = "mixshare",
        *,
        split: BackboneSplit | Callable[[nn.Module], BackboneSplit] | None = None,
        pretrained: bool = False,
        backend: str | None = None,
        **overrides: object,
    ) -> None:
        super().__init__()
        m = check_num_subnetworks(num_subnetworks)
        self.num_subnetworks = m
        check_choice("preset", preset, PRESETS)
        self.preset = preset
        self.config: MIMOConfig = get_preset(preset, **overrides)
        self.pretrained = bool(pretrained)
        if split is None:
            if backbone is None:
                raise TypeError(
                    "backbone is None: give a backbone to wrap, or split=BackboneSplit(encoder=..., core=..., "
                    "classifier=...)"
                )
            parts = split_backbone(backbone)
        elif isinstance(split, BackboneSplit):
            parts = split
        elif callable(split):
            if backbone is None:
                raise TypeError("split is a function of the backbone, but backbone is None")
            parts = split(backbone)
            if not isinstance(parts, BackboneSplit):
                raise TypeError(f"split(backbone) must return a BackboneSplit, but got {type(parts).__name__}")
        else:
            raise TypeError(f"split must be a BackboneSplit or a callable, but got {type(split).__name__}")
        if not isinstance(parts.classifier, nn.Linear):
            raise TypeError(f"split.classifier must be an nn.Linear, but got {type(parts.classifier).__name__}")

        cfg = self.config
        self.encoder = MultiEncoder(
            parts.encoder,
            m,
            init=cfg.encoder_init,
            preserve_sum=self.pretrained and cfg.encoder_init != "independent",
            reinit=parts.reinit,
        )
        self.mixer = CutMixMixer(
            m,
            alpha=cfg.alpha,
            cutmix_prob=cfg.cutmix_prob,
            cutmix_ramp=cfg.cutmix_ramp,
            shuffle_roles=cfg.shuffle_roles,
            backend=backend,
        )
        self.core = parts.core
        self.unmixer = Unmixer(
            cfg.unmix_mode,
            fraction=cfg.unmix_fraction,
            fadeout_end=cfg.fadeout_end,
            pooling=cfg.unmix_pooling,
            backend=backend,
        )
        clf = parts.classifier
        if self.pretrained:
            self.heads = MultiHead.from_linear(clf, m)
        elif parts.reinit is not None:
            # the heads start like the backbone's own classifier (for MixMo's WRN: truncated He-normal, zero bias);
            # PyTorch's default uniform init left MixMo's members 15-20 points weaker (issue 12)
            self.heads = MultiHead.from_initializer(clf, m, parts.reinit)
        else:
            self.heads = MultiHead(
                clf.in_features,
                clf.out_features,
                m,
                bias=clf.bias is not None,
                device=clf.weight.device,
                dtype=clf.weight.dtype,
            )
        self.register_buffer("progress", torch.zeros((), device=clf.weight.device))

    # ---------------------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return f"num_subnetworks={self.num_subnetworks}, preset={self.preset!r}, pretrained={self.pretrained}"

    @property
    def num_classes(self) -> int:
        return self.heads.num_classes

    def set_progress(self, progress: float) -> None:
        """Set training progress in [0, 1] (e.g. ``epoch / num_epochs``); it drives fadeout and the CutMix ramp.

        Stored in the ``progress`` buffer, so it is saved in the state dict.
        """
        p = check_real("progress", progress, low=0.0, high=1.0)
        self.progress.fill_(p)

    def make_loss(self, label_smoothing: float = 0.0) -> MIMOLoss:
        """The :class:`~mixshare_layers.MIMOLoss` of this configuration (its ``rebalance_root``)."""
        return MIMOLoss(self.config.rebalance_root, label_smoothing=label_smoothing)

    def make_batcher(self, batch_repetition: int = 1, **kwargs: object) -> MIMOBatcher:
        """A :class:`~mixshare_layers.MIMOBatcher` with this configuration's input repetition."""
        return MIMOBatcher(self.num_subnetworks, batch_repetition, self.config.input_repetition, **kwargs)  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> MIMOOutput | Tensor:
        m = self.num_subnetworks
        if self.training:
            if x.dim() != 5 or x.shape[1] != m:
                raise ValueError(
                    f"in training mode the input must have shape (B, M={m}, C, H, W) (M different images per row; "
                    f"see MIMOBatcher), but got a tensor of shape {tuple(x.shape)}"
                )
            encodings = self.encoder(x)  # (B, M, C', H', W')
            mixed, info = self.mixer(encodings, self.progress, generator)
            features = self._core(mixed)  # (B, D, h, w)
            pooled = self.unmixer(features, info, self.progress)  # (B, M, D)
            return MIMOOutput(self.heads(pooled), info)
        if x.dim() == 5:
            if x.shape[1] != m:
                raise ValueError(f"input must have shape (B, C, H, W) or (B, M={m}, C, H, W), but got {tuple(x.shape)}")
            mixed = self.encoder(x).sum(dim=1)
        elif x.dim() == 4:
            mixed = self.encoder(x)  # the summed encoders, one convolution
        else:
            raise ValueError(f"input must have shape (B, C, H, W) or (B, M={m}, C, H, W), but got {tuple(x.shape)}")
        features = self._core(mixed)
        return self.heads(features.mean(dim=(2, 3)))  # one pooled vector shared by every head

    def _core(self, mixed: Tensor) -> Tensor:
        features = self.core(mixed)
        if not isinstance(features, Tensor) or features.dim() != 4:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"the core must return spatial feature maps (B, D, h, w) (before global pooling), but returned {shape}"
            )
        return features

    def fold(self) -> nn.Module:
        """A module computing this network's eval-mode logits in one pass (:func:`mixshare_layers.deploy.fold`).

        The M encoders become one convolution (their test-time sum) and the M heads one ``nn.Linear`` with ``M * K``
        outputs; the result is a copy in eval mode, ready for ``torch.export`` / ONNX.

        Shape:
            - Input: ``(B, C, H, W)``; output: logits ``(B, M, K)``, equal to ``self.eval()(x)``.
        """
        from .deploy import fold

        return fold(self)

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor, rule: str = "prob") -> Tensor:
        """Ensemble probabilities ``(B, K)`` in eval mode (the module's mode is restored afterwards).

        ``rule="prob"`` averages member probabilities (default); ``"logit"`` averages logits (MixMo).
        """
        check_choice("rule", rule, ENSEMBLE_RULES)
        was_training = self.training
        self.eval()
        try:
            logits = self(x)
        finally:
            self.train(was_training)
        assert isinstance(logits, Tensor)
        return ensemble_probs(logits, rule)

    @staticmethod
    def ensemble(logits: Tensor, rule: str = "prob") -> Tensor:
        """Ensemble probabilities from logits ``(B, M, K) -> (B, K)``."""
        return ensemble_probs(logits, rule)

    @staticmethod
    def estimator_major(logits: Tensor) -> Tensor:
        """torch-uncertainty's layout: ``(B, M, K) -> (M * B, K)``, members in contiguous blocks."""
        return to_estimator_major(logits)
