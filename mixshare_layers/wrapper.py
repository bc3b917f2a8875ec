"""Longer than 450 lines: one class that a user reads whole (its construction checks, forward and progress schedule).

``MIMOWrapper``: any backbone (CNN or vision transformer) as a MIMO / MixMo / MixShare network.

The wrapper is the public entry point of a forward pass: it checks the images it is given and the features its core
returns, once, and its own layers take them as they are (``Unmixer(..., check_inputs=False)``, the unchecked forms
of ``mixshare_layers.functional``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_choice,
    check_floating,
    check_int,
    check_num_subnetworks,
    check_real,
    check_tensor,
    values_checked,
)
from .adapters import BackboneSplit
from .adapters.registry import resolve_split
from .adapters.split import check_core_features, no_unmixing_reason
from .functional.ensemble import ensemble_probs, to_estimator_major
from .functional.layout import _head_input
from .functional.loss import rebalanced_weights
from .functional.temperature import check_bounds, check_labels, search_temperature, tempered_probs
from .layers.batcher import MIMOBatcher
from .layers.encoder import MultiEncoder
from .layers.head import MultiHead
from .layers.loss import MIMOLoss
from .layers.mixer import CutMixMixer
from .layers.unmixer import Unmixer
from .mix_info import MixInfo
from .presets import MIMOConfig, get_preset
from .vocabulary import ENSEMBLE_RULES, FeatureLayout, HeadPooling

__all__ = ["MIMOOutput", "MIMOWrapper", "ProgressWarning"]

_STACK = {3: 0, 4: 1}  # how a list of images (C, H, W) or of member batches (B, C, H, W) stacks into the input


class ProgressWarning(UserWarning):
    """A schedule that reads training progress (fadeout unmixing, the CutMix ramp) has seen it unchanged for long.

    Raised once per stale stretch by :class:`MIMOWrapper` (see :meth:`MIMOWrapper.set_total_steps`).
    """


class MIMOOutput(NamedTuple):
    """What a training forward returns.

    Attributes:
        logits: ``(B, M, K)``; row ``i`` of sample ``b`` is subnetwork ``i``'s prediction for input ``i``.
        mix_info: the :class:`~mixshare_layers.MixInfo` of the batch (λ and the preset's loss weights for the loss,
            masks for analysis).

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

    The backbone is split into encoder / core / head (:mod:`mixshare_layers.adapters`: every torchvision and timm
    classifier, or your own split). The encoder becomes a :class:`~mixshare_layers.MultiEncoder`, a
    :class:`~mixshare_layers.CutMixMixer` mixes the M encodings in the encoder's layout, the core is shared, an
    :class:`~mixshare_layers.Unmixer` pools the final features (maps or the patch grid of tokens) per subnetwork and
    a :class:`~mixshare_layers.MultiHead` (M copies of the backbone's head) classifies.

    Args:
        backbone: the network to wrap. May be ``None`` when ``split`` is a
            :class:`~mixshare_layers.BackboneSplit`.
        num_subnetworks: M.
        preset: a key of :data:`~mixshare_layers.PRESETS`: ``"mimo"``, ``"mixmo"``, ``"unmix"``, ``"unmix-aligned"``,
            ``"mixshare"`` or ``"mixshare-partial"`` (the table in :mod:`mixshare_layers.presets`).
        split: a :class:`~mixshare_layers.BackboneSplit`, or a function of the backbone returning one.
        pretrained: (a bool) start as the backbone: aligned/colinear encoder copies are scaled to sum to the
            original first layer and every head is a copy of the backbone's head, so that in eval mode every member
            gives exactly the backbone's logits at initialisation. Presets with independent encoders (``"mimo"``,
            ``"mixmo"``, ``"unmix"``) re-initialise the first layer, which breaks that promise: they are refused
            unless ``encoder_init="aligned"`` (or ``"colinear"``) is given. With ``pretrained=False`` the M heads are
            initialised independently with the split's ``reinit`` (the backbone's own initialiser: for the library's
            WRN its ``init``, by default truncated He-normal with zero bias; ``nn.Linear``'s default when the split
            has none) and
            encoders follow ``encoder_init``; the core keeps the backbone's weights either way.
        backend: implementation of the masked ops (mixing, unmixing): ``"auto"`` (fused Triton kernels for CUDA
            tensors when triton imports, else torch), ``"torch"`` or ``"triton"``; ``None`` reads
            ``MIXSHARE_BACKEND`` (see :mod:`mixshare_layers.functional.backend`).
        total_steps: drive ``progress`` by itself: each training forward counts one step, and progress is
            ``steps / total_steps`` (see :meth:`set_total_steps`). ``None`` (default): set it with
            :meth:`set_progress`.
        **overrides: any field of :class:`~mixshare_layers.MIMOConfig` (e.g. ``alpha=1.0``, ``unmix_mode="full"``).

    Note:
        The wrapper *uses* the backbone's modules, it does not copy them: its ``core`` is the backbone's own layers,
        so training the wrapper changes the backbone object you passed in (as ``DistributedDataParallel`` or
        ``torch.compile`` would). Its first layer and classifier are copied (M encoders, M heads), so after training
        the backbone holds a trained core between an untrained stem and classifier: treat it as consumed, and pass
        ``copy.deepcopy(backbone)`` to keep the original. Build the optimizer from ``model.parameters()``.

    Raises:
        UnsupportedBackboneError: the backbone cannot be split automatically (the message says why and how).
        ValueError: an unmixing preset on a backbone whose head does not average its features (a class token,
            attention pooling, a flattening head): unmixing has nothing to filter there; the message gives the
            options (``unmix_mode="none"`` keeps the rest of the preset).

    Shape:
        - Training: ``(B, M, C, H, W)`` -> :class:`MIMOOutput` with logits ``(B, M, K)``.
        - Eval: ``(B, C, H, W)`` -> logits ``(B, M, K)``, from one pass of the core (the same image fed to every
          encoder, encodings summed); ``(B, M, C, H, W)`` is accepted too (M different images, summed encodings).
        - The core's features may be ``(B, D, h, w)``, ``(B, h, w, D)`` or tokens ``(B, P + h w, D)`` (the split's
          ``layout``); the mixing happens on the encoder's output, before the core adds positional embeddings and
          prefix tokens.

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
    num_steps: Tensor
    total_steps: Tensor
    temperature: Tensor  #: ``(2,)``: the temperature of each ensemble rule (``ENSEMBLE_RULES`` order), see calibrate

    #: A preset whose schedule reads progress (fadeout, CutMix ramp) warns (:class:`ProgressWarning`) after this many
    #: training forwards with an unchanged progress and no ``total_steps``; ``None`` disables the warning.
    stale_progress_warning: int | None = 10_000

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_subnetworks: int = 2,
        preset: str = "mixshare",
        *,
        split: BackboneSplit | Callable[[nn.Module], BackboneSplit] | None = None,
        pretrained: bool = False,
        backend: str | None = None,
        total_steps: int | None = None,
        **overrides: object,
    ) -> None:
        super().__init__()
        self.num_subnetworks = m = check_num_subnetworks(num_subnetworks)
        self.config: MIMOConfig = get_preset(preset, **overrides)  # checks the name and the overrides
        self.preset = preset
        self.pretrained = check_bool("pretrained", pretrained)
        if self.pretrained and self.config.encoder_init == "independent":
            raise ValueError(
                f"pretrained=True starts the network as the backbone, but preset {preset!r} has independent encoders "
                "(encoder_init='independent'), which re-initialises the backbone's first layer. Pass "
                "encoder_init='aligned' (or 'colinear') to keep it, or pretrained=False (the core keeps the "
                "backbone's weights; encoders and heads start afresh)"
            )
        parts = resolve_split(backbone, split)
        name = type(backbone).__name__ if backbone is not None else "the split's backbone"
        cfg = self.config
        reason = no_unmixing_reason(parts, name)
        if reason is not None and cfg.unmix_mode != "none":
            raise ValueError(
                f"preset {preset!r} unmixes the final features (unmix_mode={cfg.unmix_mode!r}), but {reason}. "
                f"Keep the rest of the preset without unmixing: MIMOWrapper(net, {m}, {preset!r}, "
                "unmix_mode='none'), or use preset='mixmo' / 'mimo'; to unmix, give the backbone a head that "
                "averages its features (timm: timm.create_model(name, global_pool='avg', class_token=False) for a "
                "ViT)."
            )
        self.pooling = cast(HeadPooling, parts.pooling)  # checked with the split; layout and P: the unmixer's
        self.preprocess = parts.preprocess
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
            layout=parts.encoding_layout,
            backend=backend,
        )
        self.core = parts.core
        self.unmixer = Unmixer(
            cfg.unmix_mode,
            fraction=cfg.unmix_fraction,
            fadeout_end=cfg.fadeout_end,
            pooling=cfg.unmix_pooling,
            layout=parts.layout,
            num_prefix_tokens=parts.num_prefix_tokens,
            backend=backend,
        )
        # without pretrained weights the heads start like the backbone's own head: one draw of the split's reinit
        # each (for the library's WRN its init, by default truncated He-normal with zero bias: better for MixMo's
        # members than nn.Linear's default)
        self.heads = MultiHead.from_module(
            parts.classifier,
            m,
            copy_weights=self.pretrained,
            reinit=parts.reinit,
            input_ndim=parts.head_input_ndim,
        )
        device = next((p.device for p in self.heads.parameters()), None)
        self.register_buffer("progress", torch.zeros((), device=device))
        # the total-steps mode (set_total_steps): training forwards done, and the total (0: progress set by hand)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("temperature", torch.ones(len(ENSEMBLE_RULES), device=device))
        self._steps_drive_progress = False  # mirrors total_steps > 0 on the host, so forward never reads the buffer
        self._stale_forwards = 0  # training forwards since progress last changed (eager mode, progress set by hand)
        self._last_progress: float | None = 0.0
        if total_steps is not None:
            self.set_total_steps(total_steps)

    # ---------------------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return f"num_subnetworks={self.num_subnetworks}, preset={self.preset!r}, pretrained={self.pretrained}"

    @property
    def layout(self) -> FeatureLayout:
        """The core's output layout (:data:`~mixshare_layers.vocabulary.FeatureLayout`), kept by the unmixer."""
        return self.unmixer.layout

    @property
    def num_prefix_tokens(self) -> int:
        """``P``, the prefix tokens before the patch grid (``layout="tokens"``), kept by the unmixer."""
        return self.unmixer.num_prefix_tokens

    @property
    def num_classes(self) -> int | None:
        """K (``None`` when a generic head has no ``nn.Linear`` / ``nn.Conv2d`` to read it from)."""
        return self.heads.num_classes

    def split(self) -> BackboneSplit:
        """This network's layout and pooling as a :class:`~mixshare_layers.BackboneSplit` of its own parts (the
        encoder and head fields hold the :class:`~mixshare_layers.MultiEncoder` and
        :class:`~mixshare_layers.MultiHead`)."""
        return BackboneSplit(
            encoder=self.encoder,
            core=self.core,
            classifier=self.heads,
            layout=self.layout,
            num_prefix_tokens=self.num_prefix_tokens,
            pooling=self.pooling,
            encoding_layout=self.mixer.layout,
            preprocess=self.preprocess,
        )

    def set_progress(self, progress: float | Tensor) -> None:
        """Set training progress in [0, 1] (e.g. ``epoch / num_epochs``); it drives fadeout and the CutMix ramp.

        Stored in place in the ``progress`` buffer (saved in the state dict; a captured CUDA graph sees the new
        value). ``progress`` may be a Python or NumPy number or a 0-dim tensor. A tensor on an accelerator is copied
        on the device without being read (no synchronisation), so its range is checked only under
        ``set_value_checks("always")``; the schedules clamp it to [0, 1] anyway.

        For per-step progress without calling this, see :meth:`set_total_steps`.
        """
        if self._steps_drive_progress:
            raise ValueError(
                f"progress is driven by the step counter (total_steps={int(self.total_steps)}); call "
                "model.set_total_steps(None) first to set it by hand"
            )
        if isinstance(progress, Tensor) and not values_checked(progress):
            if progress.dim() != 0 or progress.dtype == torch.bool or progress.is_complex():
                raise ValueError(
                    f"progress must be a number or a 0-dim real tensor, but got a tensor of shape "
                    f"{tuple(progress.shape)} and dtype {progress.dtype}"
                )
            self.progress.copy_(progress.detach())
            value = None
        else:
            value = check_real("progress", progress, low=0.0, high=1.0)
            self.progress.fill_(value)
        if value is None or value != self._last_progress:
            self._stale_forwards = 0
        self._last_progress = value

    def set_total_steps(self, total_steps: int | None, *, step: int = 0) -> None:
        """Drive progress by a step counter: each training forward counts one step, progress = steps / total.

        The counter (``num_steps``) and the total (``total_steps``) are buffers: the division and the count run on
        the model's device inside the forward (no host synchronisation, nothing to call per step), work under
        ``torch.compile(fullgraph=True)`` and in a captured CUDA graph (each replay counts), are saved in the state
        dict (a resumed run continues its schedules; loading also restores the mode), and are identical on every
        DDP rank. Progress stays at 1 past ``total_steps``.

        Args:
            total_steps: the number of *training forwards* of the whole run (``num_epochs * len(loader)``; with
                gradient accumulation, count every micro-batch). ``None`` returns to setting progress by hand with
                :meth:`set_progress` (the current progress is kept).
            step: the counter's new value (0 at the start of a run; e.g. to reset it after CUDA-graph warm-up
                steps, which count).

        Example:
            >>> from mixshare_layers.models import wide_resnet
            >>> model = MIMOWrapper(wide_resnet(10, 1, num_classes=10), 2, "mixshare", total_steps=4)
            >>> for _ in range(3):
            ...     _ = model(torch.randn(2, 2, 3, 32, 32))
            >>> float(model.progress), int(model.num_steps)  # the last forward ran at progress 2 / 4
            (0.5, 3)
        """
        if total_steps is None:
            self.total_steps.zero_()
            self._steps_drive_progress = False
            self._stale_forwards = 0
            self._last_progress = None
            return
        total = check_int("total_steps", total_steps, minimum=1)
        count = check_int("step", step, minimum=0)
        self.total_steps.fill_(total)
        self.num_steps.fill_(count)
        self.progress.fill_(min(1.0, count / total))
        self._steps_drive_progress = True

    def _training_progress(self) -> Tensor:
        """The progress this training forward runs at (counting the step in the total-steps mode)."""
        if self._steps_drive_progress:
            self.progress.copy_((self.num_steps / self.total_steps).clamp(max=1.0))  # on device, no sync
            self.num_steps.add_(1)
        elif self._schedule_reads_progress() and not torch.compiler.is_compiling():
            self._stale_forwards += 1
            if self._stale_forwards == self.stale_progress_warning:
                cfg = self.config
                what = "fadeout unmixing" if cfg.unmix_mode == "fadeout" else "the CutMix ramp"
                shown = "unchanged" if self._last_progress is None else f"still {self._last_progress:g}"
                warnings.warn(
                    f"{self._stale_forwards} training forwards have run with progress {shown}, but {what} of preset "
                    f"{self.preset!r} reads progress, so the schedule is not moving. Call "
                    "model.set_total_steps(num_epochs * steps_per_epoch) once (progress then advances on its own, "
                    "on device), or model.set_progress(epoch / num_epochs) every epoch. (If your epochs are longer "
                    "than this, set model.stale_progress_warning = None or a larger count.)",
                    ProgressWarning,
                    stacklevel=5,  # the caller of the module (past forward, _call_impl, _wrapped_call_impl)
                )
        return self.progress

    def _schedule_reads_progress(self) -> bool:
        cfg = self.config
        return cfg.unmix_mode == "fadeout" or (cfg.cutmix_ramp > 0 and cfg.cutmix_prob > 0)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("num_steps", "total_steps"):  # a state dict written before these buffers: progress by hand
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        state_dict.setdefault(prefix + "temperature", torch.ones_like(self.temperature))  # ... and uncalibrated
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        total = state_dict[prefix + "total_steps"]
        if isinstance(total, Tensor) and total.device.type != "meta":
            self._steps_drive_progress = int(total) > 0  # the mode travels with the checkpoint
        self._stale_forwards = 0
        self._last_progress = None

    def make_loss(self, label_smoothing: float = 0.0, *, ignore_index: int | None = None) -> MIMOLoss:
        """The :class:`~mixshare_layers.MIMOLoss` of this configuration.

        Its weights come from the outputs of this model (``mix_info.loss_weights``, set from the preset's
        ``rebalance_root``), so it is the same loss as ``MIMOLoss(label_smoothing=..., ignore_index=...)``.
        """
        return MIMOLoss("auto", label_smoothing=label_smoothing, ignore_index=ignore_index)

    def make_batcher(self, batch_repetition: int = 1, **kwargs: object) -> MIMOBatcher:
        """A :class:`~mixshare_layers.MIMOBatcher` with this configuration's input repetition.

        The keyword arguments (``transform``, ``augment``, ``generator``) go to the batcher as they are.
        """
        return MIMOBatcher(self.num_subnetworks, batch_repetition, self.config.input_repetition, **kwargs)  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> MIMOOutput | Tensor:
        m = self.num_subnetworks
        check_tensor(
            "x", x, "(B, M, C, H, W)" if self.training else "(B, C, H, W) or (B, M, C, H, W)", stack_dim=_STACK
        )
        if self.preprocess is not None:  # the split's parameter-free input transform, on (B, C, H, W) images
            x = self.preprocess(x.flatten(0, 1)).unflatten(0, x.shape[:2]) if x.dim() == 5 else self.preprocess(x)
        if self.training:
            if x.dim() != 5 or x.shape[1] != m:
                raise ValueError(
                    f"x must have shape (B, M={m}, C, H, W) in training mode (M different images per row; "
                    f"see MIMOBatcher), but got a tensor of shape {tuple(x.shape)}"
                )
            encodings = self.encoder(x)  # (B, M, C', H', W')
            progress = self._training_progress()  # the progress buffer (advanced on device with total_steps)
            mixed, info = self.mixer(encodings, progress, generator)
            unmixer = self.unmixer  # it keeps the layout and P
            features = self._core(mixed, unmixer)  # (B, D, h, w), (B, h, w, D) or (B, P + h w, D), checked
            if self.pooling == "avg":
                pooled = unmixer(features, info, progress, check_inputs=False)  # (B, M, D)
            else:  # one input shared by every head
                pooled = _head_input(features, unmixer.layout, self.pooling, unmixer.num_prefix_tokens)
            info = info._replace(loss_weights=rebalanced_weights(info.ratios, self.config.rebalance_root))
            return MIMOOutput(self.heads(pooled), info)
        if x.dim() not in (4, 5) or (x.dim() == 5 and x.shape[1] != m):
            raise ValueError(f"x must have shape (B, C, H, W) or (B, M={m}, C, H, W), but got {tuple(x.shape)}")
        mixed = self.encoder(x) if x.dim() == 4 else self.encoder(x).sum(dim=1)  # (B, C, H, W): one convolution
        unmixer = self.unmixer
        features = self._core(mixed, unmixer)
        # one input shared by every head: the grid average, the class token, or the features themselves
        return self.heads(_head_input(features, unmixer.layout, self.pooling, unmixer.num_prefix_tokens))

    def _core(self, mixed: Tensor, unmixer: Unmixer) -> Tensor:
        """The core's features, checked here once (in ``unmixer``'s layout): what reads them takes them as they are."""
        features = self.core(mixed)
        if self.pooling == "head":  # the heads read the features as they are (even several maps, in a list)
            return features
        return check_core_features(features, unmixer.layout, unmixer.num_prefix_tokens, mixed.shape[0])

    def fold(self) -> nn.Module:
        """A module computing this network's eval-mode logits in one pass (:func:`mixshare_layers.deploy.fold`).

        The M encoders become one layer (their test-time sum; M copies summed for a non-linear first layer) and M
        linear heads one ``nn.Linear`` with ``M * K`` outputs; the result is a copy in eval mode, ready for
        ``torch.export`` / ONNX.

        It keeps the temperatures of :meth:`calibrate` and has the same ``predict``.

        Shape:
            - Input: ``(B, C, H, W)``; output: logits ``(B, M, K)``, equal to ``self.eval()(x)``.
        """
        from .deploy import fold

        return fold(self)

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self, images: Tensor, labels: Tensor, *, batch_size: int = 256, bounds: tuple[float, float] = (0.05, 20.0)
    ) -> dict[str, float]:
        """Fit one temperature per ensemble rule on held-out data and keep them in the model.

        Runs the model in eval mode (its mode is restored afterwards) on ``images`` in batches, then fits, for each
        rule, the ``T`` minimising the NLL of ``softmax(log p_ens / T)``
        (:func:`~mixshare_layers.evaluation.fit_temperature`'s ``mode="ensemble"``: golden-section search on
        ``log T``, float64, deterministic). The temperatures go into the ``temperature`` buffer, so the state dict,
        ``save_model`` / ``load_model`` and :meth:`fold` carry them; :meth:`predict` uses them. The logits of
        ``forward`` stay the members' own.

        Args:
            images: held-out images as :meth:`predict` takes them, ``(N, C, H, W)`` (or ``(N, M, C, H, W)``);
                never the test set.
            labels: their class indices ``(N,)`` in ``[0, K)``.
            batch_size: images per forward pass.
            bounds: the search interval of ``T`` (a ``RuntimeWarning`` says when the optimum lies on its edge).

        Returns:
            ``{"prob": T, "logit": T}``.
        """
        images = check_tensor("images", images, "(N, C, H, W) or (N, M, C, H, W)", stack_dim=_STACK)
        if images.dim() not in (4, 5) or images.shape[0] == 0:
            raise ValueError(
                f"images must be a non-empty batch of shape (N, C, H, W) or (N, M, C, H, W), but got "
                f"{tuple(images.shape)}"
            )
        check_floating("images", images, "floating-point images, as predict takes them")
        against = f"images of shape {tuple(images.shape)}"
        labels = check_labels("labels", labels, images.shape[0], self.num_classes, against)
        batch_size, bounds = check_int("batch_size", batch_size, minimum=1), check_bounds(bounds)
        was_training = self.training
        self.eval()
        try:
            logits = torch.cat([cast(Tensor, self(x)) for x in images.split(batch_size)])
        finally:
            self.train(was_training)
        if self.num_classes is None:  # a generic head: K is known now
            check_labels("labels", labels, images.shape[0], logits.shape[-1], against)
        if not bool(logits.isfinite().all()):
            raise ValueError(f"the model's logits on images are not all finite (NaN or inf): check {against}")
        fitted: dict[str, float] = {}
        for rule in ENSEMBLE_RULES:  # a warning points at the caller, past this and torch.no_grad's frame
            fitted[rule] = search_temperature(logits, labels, rule, "ensemble", bounds, stacklevel=4)
        self.temperature.copy_(torch.tensor([fitted[rule] for rule in ENSEMBLE_RULES]))
        return fitted

    @torch.no_grad()
    def predict(self, x: Tensor, rule: str = "prob", *, calibrated: bool = True) -> Tensor:
        """Ensemble probabilities ``(B, K)`` in eval mode (the module's mode is restored afterwards).

        ``rule="prob"`` averages member probabilities (default); ``"logit"`` averages logits (MixMo). With
        ``calibrated`` (default), at the temperature :meth:`calibrate` fitted for the rule,
        ``softmax(log p_ens / T)`` (``T = 1`` until then: the probabilities as they are); ``calibrated=False``: the
        raw probabilities.
        """
        check_choice("rule", rule, ENSEMBLE_RULES)
        check_bool("calibrated", calibrated)
        was_training = self.training
        self.eval()
        try:
            logits = self(x)
        finally:
            self.train(was_training)
        assert isinstance(logits, Tensor)
        t = self.temperature[ENSEMBLE_RULES.index(cast(Any, rule))]
        return tempered_probs(logits, rule, t) if calibrated and bool(t != 1) else ensemble_probs(logits, rule)

    @staticmethod
    def ensemble(logits: Tensor, rule: str = "prob") -> Tensor:
        """Ensemble probabilities from logits ``(B, M, K) -> (B, K)``."""
        return ensemble_probs(logits, rule)

    @staticmethod
    def estimator_major(logits: Tensor) -> Tensor:
        """torch-uncertainty's layout: ``(B, M, K) -> (M * B, K)``, members in contiguous blocks."""
        return to_estimator_major(logits)
