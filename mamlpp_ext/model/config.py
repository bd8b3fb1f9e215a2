"""Settings of a MAML++ (or plain MAML) run, and the public presets.

``MAMLConfig`` is a plain dataclass holding every setting of SPEC §3/§4: the
task shape (ways, shots, queries, meta-batch, image shape), the network
(stages, filters), the inner loop (steps, learning rate, LSLR), the outer loop
(Adam meta learning rate, cosine annealing, gradient clamp) and the switches of
the six MAML++ components (MSL, DA, BNRS, BNWB, LSLR, CA). Values are checked
when the object is built, with errors that name the field.

Presets: ``from_preset("omniglot-5way-1shot")`` and friends give the public
MAML++ settings; the ``-maml`` suffix gives plain MAML on the same task shape
(all six components off, see SPEC §3) and ``-fomaml`` first-order plain MAML.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .networks import NETWORKS

__all__ = ["MAMLConfig", "from_preset", "preset_names", "default_augment", "BN_EVAL_STATS"]

BN_EVAL_STATS = ("batch", "running")


def default_augment(dataset: str) -> bool:
    """Whether training tasks of ``dataset`` are augmented by default: Omniglot yes, others no
    (the public MAML++ code rotates classes only when the dataset name contains "omniglot")."""
    return "omniglot" in dataset


@dataclass
class MAMLConfig:
    """Every setting of a MAML++ meta-learner (SPEC §3, §4).

    Task shape: ``ways`` classes per task, ``shots`` support and ``queries``
    query images per class, ``meta_batch`` tasks per outer step, images of
    shape ``(image_channels, image_height, image_width)``.

    The six MAML++ components and their switches:

    * MSL: ``use_msl``, ``msl_epochs`` (multi-step loss while epoch < msl_epochs).
    * DA: second-order meta-gradients when
      ``second_order and epoch > first_order_to_second_order_epoch``.
    * BNRS: ``per_step_bn_statistics`` (running stats of shape (S, C) instead of (1, C)).
    * BNWB: ``per_step_bn_weights`` (BN gamma/beta of shape (S, C) instead of (1, C)).
    * LSLR: ``learnable_inner_lr`` (rates are meta-learned) and ``per_step_inner_lr``
      (one rate per step, shape (K, S), instead of (K, 1)).
    * CA: ``cosine_annealing`` of the Adam meta learning rate from ``meta_lr``
      down to ``min_meta_lr`` over ``total_epochs``.

    Network: ``network`` is a built-in network (``networks.NETWORKS``): "vgg" (the SPEC §2 net,
    shaped by ``num_stages``, ``num_filters``, ``leaky_relu_slope``, ``bn_momentum`` and
    ``bn_eps``), "conv4" or "resnet12" (shaped by ``network_widths``, ``bn_momentum`` and
    ``bn_eps``); "package.module:function" (a function called with this config that returns an
    ``nn.Module`` of standard layers or a ``mamlpp_ext.model.network.TaskNetwork``); or "custom"
    (the network object was handed to the meta-learner directly; it is needed again to rebuild
    the learner). ``network_widths``: channels per stage of conv4 / resnet12 (None: the
    network's default — conv4 64 per stage on Omniglot, 32 elsewhere; resnet12 64-160-320-640);
    a list, a tuple or a comma-separated string, stored as a tuple. See docs/networks.md.

    Other options: ``bn_eval_stats`` ("batch": normalise with batch statistics at
    evaluation, as the public code does; "running": with the per-step running
    statistics), ``adapt_bn_affine`` (BN gamma/beta become per-task fast weights
    of shape (C,), adapted in the inner loop; needs ``per_step_bn_weights=False``),
    ``grad_clamp`` (clamp network meta-gradients element-wise to
    [-grad_clamp, grad_clamp]; None = off), ``augment`` (rotate each class of a
    training task by a random multiple of 90°; None, the default, means the
    dataset's own setting: on for Omniglot, off for mini-ImageNet, as the public
    code, whose augmentation is tied to the dataset name containing "omniglot").
    """

    # --- task shape ---
    ways: int = 5
    shots: int = 1
    queries: int = 1
    meta_batch: int = 8
    image_channels: int = 1
    image_height: int = 28
    image_width: int = 28
    # --- network (SPEC §2) ---
    network: str = "vgg"
    num_stages: int = 4
    num_filters: int = 64
    leaky_relu_slope: float = 0.01
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    network_widths: Optional[tuple] = None  # conv4 / resnet12 channels per stage; None: the network's default
    # --- inner loop ---
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.1
    learnable_inner_lr: bool = True
    per_step_inner_lr: bool = True
    adapt_bn_affine: bool = False
    # --- outer loop ---
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5
    cosine_annealing: bool = True
    grad_clamp: Optional[float] = None
    total_epochs: int = 100
    iterations_per_epoch: int = 500
    # --- MAML++ components ---
    use_msl: bool = True
    msl_epochs: int = 10
    second_order: bool = True
    first_order_to_second_order_epoch: int = -1
    per_step_bn_statistics: bool = True
    per_step_bn_weights: bool = True
    bn_eval_stats: str = "batch"
    # --- evaluation protocol and reproducibility ---
    eval_tasks: int = 600
    ensemble_top_k: int = 5
    seed: int = 0
    dataset: str = "omniglot"
    # --- data ---
    augment: Optional[bool] = None  # None: default_augment(dataset); a bool after construction

    def __post_init__(self) -> None:
        if self.augment is None and isinstance(self.dataset, str):
            self.augment = default_augment(self.dataset)
        self.network_widths = _widths_tuple(self.network_widths)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""

        def _int(name: str, lo: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"MAMLConfig.{name} must be an int, got {type(v).__name__} ({v!r})")
            if lo is not None and v < lo:
                raise ValueError(f"MAMLConfig.{name} must be >= {lo}, got {v}")

        def _float(name: str, lo: float | None = None, hi: float | None = None,
                   lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"MAMLConfig.{name} must be a number, got {type(v).__name__} ({v!r})")
            if not math.isfinite(v):
                raise ValueError(f"MAMLConfig.{name} must be finite, got {v}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"MAMLConfig.{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"MAMLConfig.{name} must be <= {hi}, got {v}")

        def _bool(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"MAMLConfig.{name} must be a bool, got {type(v).__name__} ({v!r})")

        for name in ("ways", "shots", "queries", "meta_batch", "image_channels", "image_height",
                     "image_width", "num_stages", "num_filters", "inner_steps", "eval_inner_steps",
                     "total_epochs", "iterations_per_epoch", "eval_tasks", "ensemble_top_k"):
            _int(name, 1)
        _int("msl_epochs", 0)
        _int("first_order_to_second_order_epoch")
        _int("seed", 0)
        _float("leaky_relu_slope", 0.0)
        _float("bn_momentum", 0.0, 1.0)
        _float("bn_eps", 0.0, lo_open=True)
        _float("inner_lr", 0.0, lo_open=True)  # <= 0 never learns (0: no adaptation; < 0: ascent)
        _float("meta_lr", 0.0, lo_open=True)
        _float("min_meta_lr", 0.0)
        if self.min_meta_lr > self.meta_lr:
            raise ValueError(f"MAMLConfig.min_meta_lr ({self.min_meta_lr}) must be <= meta_lr ({self.meta_lr})")
        if self.grad_clamp is not None:
            _float("grad_clamp", 0.0, lo_open=True)
        for name in ("learnable_inner_lr", "per_step_inner_lr", "adapt_bn_affine", "cosine_annealing",
                     "use_msl", "second_order", "per_step_bn_statistics", "per_step_bn_weights", "augment"):
            _bool(name)
        if self.bn_eval_stats not in BN_EVAL_STATS:
            raise ValueError(f"MAMLConfig.bn_eval_stats must be one of {BN_EVAL_STATS}, got {self.bn_eval_stats!r}")
        if not isinstance(self.network, str) or not (self.network in NETWORKS or self.network == "custom"
                                                     or _is_import_path(self.network)):
            raise ValueError(f"MAMLConfig.network must be one of {sorted(NETWORKS)}, 'custom' or an import path "
                             f"'package.module:function', got {self.network!r}")
        if not isinstance(self.dataset, str):
            raise TypeError(f"MAMLConfig.dataset must be a str, got {type(self.dataset).__name__}")
        widths = self.network_widths
        if widths is not None:
            if not isinstance(widths, (tuple, list)) or not widths or any(
                    isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
                raise ValueError(f"MAMLConfig.network_widths must be None or a non-empty list of positive ints "
                                 f"(channels per stage, e.g. [64, 160, 320, 640]), got {widths!r}")
            if self.network in NETWORKS and NETWORKS[self.network].default_widths(self) is None:
                raise ValueError(f"MAMLConfig.network_widths does not apply to network={self.network!r} (it shapes "
                                 f"conv4 and resnet12; the VGG network is shaped by num_stages and num_filters)")
        for name in ("image_height", "image_width"):
            v = getattr(self, name)
            if self.network in NETWORKS and v >> NETWORKS[self.network].stages(self) < 1:
                stages = NETWORKS[self.network].stages(self)
                what = f"num_stages={stages}" if self.network == "vgg" else \
                    f"the {stages} stages of network={self.network!r}"
                raise ValueError(
                    f"MAMLConfig.{name}={v} is too small for {what}: each stage "
                    f"halves the feature map, so it must be >= {2 ** stages} (for a "
                    f"network of your own, set network='custom' or network='package.module:function')")
        if self.adapt_bn_affine and self.per_step_bn_weights:
            raise ValueError(
                "MAMLConfig.adapt_bn_affine=True needs per_step_bn_weights=False: adapted BN gamma/beta "
                "are per-task fast weights of shape (C,) (SPEC §2), not per-step rows")

    # --------------------------------------------------------------- derived
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.image_channels, self.image_height, self.image_width)

    def replace(self, **overrides: Any) -> "MAMLConfig":
        """A validated copy with some fields changed."""
        _check_keys(overrides, "override")
        return dataclasses.replace(self, **overrides)

    # ----------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        """A JSON-friendly dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MAMLConfig":
        """Build from ``to_dict()`` output; unknown keys are an error. A missing field takes its
        default (a config stored before ``augment`` existed gets its dataset's default)."""
        if not isinstance(d, dict):
            raise TypeError(f"MAMLConfig.from_dict expects a dict, got {type(d).__name__}")
        _check_keys(d, "key")
        return cls(**d)


def _widths_tuple(widths):
    """``network_widths`` as given (a list from JSON/YAML, a "64,160,320,640" string from --set) as
    a tuple of ints; anything else is returned as is for ``validate`` to reject."""
    if isinstance(widths, str):
        try:
            return tuple(int(w) for w in widths.replace(" ", "").strip("()[]").split(","))
        except ValueError:
            return widths
    if isinstance(widths, list):
        return tuple(widths)
    return widths


def _is_import_path(text: str) -> bool:
    module, sep, func = text.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and func.isidentifier()


def _check_keys(d: dict, what: str) -> None:
    known = {f.name for f in dataclasses.fields(MAMLConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown MAMLConfig {what}(s) {unknown}; known fields: {sorted(known)}")


# ---------------------------------------------------------------------------
# Presets (SPEC §4)
# ---------------------------------------------------------------------------

def _omniglot(ways: int, shots: int) -> dict:
    return dict(ways=ways, shots=shots, queries=1, meta_batch=8, image_channels=1, image_height=28,
                image_width=28, num_filters=64, inner_steps=5, eval_inner_steps=5, inner_lr=0.1,
                meta_lr=1e-3, min_meta_lr=1e-5, total_epochs=100, iterations_per_epoch=500,
                msl_epochs=10, grad_clamp=None, dataset="omniglot", augment=True)


def _mini_imagenet(ways: int, shots: int) -> dict:
    # inner_lr 0.01 is the intended value (the public code effectively used 0.1, SPEC §3 LSLR);
    # min_meta_lr = meta_lr as in the public config, which disables annealing (SPEC §3 CA);
    # no rotations (the public code augments Omniglot only, SPEC §5).
    return dict(ways=ways, shots=shots, queries=15, meta_batch=2, image_channels=3, image_height=84,
                image_width=84, num_filters=48, inner_steps=5, eval_inner_steps=5, inner_lr=0.01,
                meta_lr=1e-3, min_meta_lr=1e-3, total_epochs=100, iterations_per_epoch=500,
                msl_epochs=15, grad_clamp=10.0, dataset="mini-imagenet", augment=False)


# Plain MAML (SPEC §3): all six components off, same task shape and budget.
_PLAIN_MAML = dict(use_msl=False, per_step_bn_statistics=False, per_step_bn_weights=False,
                   learnable_inner_lr=False, per_step_inner_lr=False, cosine_annealing=False,
                   second_order=True, first_order_to_second_order_epoch=-1)

_BASES = {
    "omniglot-5way-1shot": _omniglot(5, 1),
    "omniglot-5way-5shot": _omniglot(5, 5),
    "omniglot-20way-1shot": _omniglot(20, 1),
    "omniglot-20way-5shot": _omniglot(20, 5),
    "mini-imagenet-5way-1shot": _mini_imagenet(5, 1),
    "mini-imagenet-5way-5shot": _mini_imagenet(5, 5),
}

# MAML++ with a ResNet-12 on mini-ImageNet (docs/networks.md): the mini-ImageNet task shape and
# budget above, which ALFA's second-order ResNet-12 setting (baiksung/ALFA,
# experiment_config/alfa+maml_resnet12.json) shares — 2 tasks per meta-batch, 5 inner steps,
# second order, inner lr 0.01, meta lr 1e-3, 15 queries, 100 × 500 iterations.
_BASES.update({f"mini-imagenet-5way-{k}shot-resnet12": {**_mini_imagenet(5, k), "network": "resnet12"}
               for k in (1, 5)})

# The datasets beyond the paper (docs/data.md names each source). The data layer's registry
# (mamlpp_ext.data.registry) holds the datasets themselves; a preset names one.


def _conv4_32px(dataset: str, ways: int, shots: int) -> dict:
    # MAML's 4-conv network on 32x32 CIFAR images (32 filters; 32 -> 16 -> 8 -> 4 -> 2) with
    # Finn et al.'s mini-ImageNet settings: 15 queries per class, 4 tasks per meta-batch for
    # 1-shot and 2 for 5-shot, inner lr 0.01, 5 inner steps, meta lr 1e-3 -- the MAML baseline
    # Bertinetto et al. (CIFAR-FS) and Sun et al. (FC100) report. Conv-4 (network "conv4") is
    # conv 3x3 -> BN -> ReLU -> max-pool 2x2, 32 filters per stage off Omniglot.
    return dict(ways=ways, shots=shots, queries=15, meta_batch=4 if shots == 1 else 2, image_channels=3,
                image_height=32, image_width=32, network="conv4", inner_steps=5,
                eval_inner_steps=5, inner_lr=0.01, meta_lr=1e-3, min_meta_lr=1e-3, total_epochs=100,
                iterations_per_epoch=500, msl_epochs=15, grad_clamp=10.0, dataset=dataset, augment=False)


def _like_mini_imagenet(dataset: str, ways: int, shots: int) -> dict:
    # 84x84 RGB: the MAML++ mini-ImageNet settings (VGG net, 48 filters), which ALFA's MAML
    # baseline on tieredImageNet also uses; CUB and the user's own folders the same.
    return {**_mini_imagenet(ways, shots), "dataset": dataset}


for _k in (1, 5):
    _BASES[f"cifar-fs-5way-{_k}shot"] = _conv4_32px("cifar-fs", 5, _k)
    _BASES[f"fc100-5way-{_k}shot"] = _conv4_32px("fc100", 5, _k)
    for _dataset in ("tiered-imagenet", "cub", "folder"):
        _BASES[f"{_dataset}-5way-{_k}shot"] = _like_mini_imagenet(_dataset, 5, _k)

_PRESETS: dict[str, dict] = {}
for _name, _base in _BASES.items():
    _PRESETS[_name] = dict(_base)
    _PRESETS[_name + "-maml"] = {**_base, **_PLAIN_MAML}
    _PRESETS[_name + "-fomaml"] = {**_base, **_PLAIN_MAML, "second_order": False}


def preset_names() -> list[str]:
    """Names accepted by ``from_preset``."""
    return sorted(_PRESETS)


def from_preset(name: str, **overrides: Any) -> MAMLConfig:
    """The config of a public setting (SPEC §4), with optional field overrides.

    ``name``: e.g. "omniglot-5way-1shot" (MAML++), "omniglot-5way-1shot-maml" (plain MAML),
    "mini-imagenet-5way-5shot-fomaml" (first-order plain MAML); see ``preset_names()``.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {preset_names()}")
    _check_keys(overrides, "override")
    return MAMLConfig(**{**_PRESETS[name], **overrides})
