"""The hooks engine against the batch-of-one loop in float64 on many timm (or torchvision) architectures: is it
exact, and what does it leave to the fallback?

Run: ``python -m benchmarks.fisher_sweep [--models resnet18 deit_tiny_patch16_224:64 ...]``. Writes
``benchmarks/results/fisher_sweep.md``; ``--family torchvision`` runs torchvision's classification, segmentation and
video models instead (``fisher_sweep_torchvision.md``). *default engine*: the error of ``engine="auto"`` (vmap, or the
loop where vmap cannot run the model), and which ran. Each model: random weights, eval mode, float64, 3 random images
at the size given after the colon (64 by default; models that fix their resolution get theirs), one chunk of 3.
*largest error*: over the candidate tensors, ``max |hooks − loop|`` ÷ that tensor's largest loop entry (floored at
1e-10 of the model's largest, so that a tensor zero by structure compares its rounding with the model's scale), the
tolerance of ``tests/test_engines.py``: 1e-8. *fallback tensors*: those the per-layer rules and local gradients left
to the whole-model fallback (vmap, or the loop where vmap cannot run). Times are one call each, float64 on the threads
given, for orientation only (``fisher_zoo`` measures speed): the engine's first call on a model runs its one-off
checks (batch-of-one forwards, and each local gradient against the loop on 2 samples), which cost about as much as the
loop over these 3 samples; *hooks* is the second call, which keeps the first one's decisions.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import gradsel

from .common import machine, md_table, write
from .fisher_zoo import hooks_and_fallen

MODELS = ["resnet18", "resnet50d", "regnetx_002", "densenet121", "vgg11", "dla34", "rexnet_100", "ghostnet_100",
          "mobilenetv3_small_100", "lcnet_050", "nf_resnet26", "dm_nfnet_f0", "cspresnet50", "dpn68", "hrnet_w18_small",
          "deit_tiny_patch16_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "twins_svt_small",
          "pvt_v2_b0", "mobilevit_xxs", "edgenext_xx_small", "fastvit_t8", "repvit_m1", "efficientvit_b0",
          "focalnet_tiny_srf", "davit_tiny", "poolformerv2_s12", "inception_next_tiny", "mvitv2_tiny", "convit_tiny",
          "visformer_tiny", "gcvit_xxtiny", "nest_tiny", "coatnet_0_rw_224", "coat_lite_tiny",
          "beit_base_patch16_224:32", "eva02_tiny_patch14_224:28", "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224",
          "convmixer_768_32:32", "sequencer2d_s:32", "levit_128s:224", "efficientformer_l1:224", "tnt_s_patch16_224:224",
          "crossvit_tiny_240:240", "swin_tiny_patch4_window7_224:112", "convnext_atto", "efficientnet_b0"]
FIXED_SIZE = ("levit", "efficientformer_l", "crossvit", "tnt")  # timm builds these for their own resolution only
COLUMNS = ["model", "input", "tensors", "fallback tensors", "largest error", "at", "exact",
           "default engine: largest error", "default engine", "hooks, first call (s)", "hooks (s)", "loop (s)",
           "left to the fallback (first 3)"]
#: torchvision's classification, segmentation (the loss on ``out``) and video (4 frames) models: (kind, input size)
TORCHVISION = {**{name: ("image", size) for name, size in [
    ("resnet18", 64), ("resnext50_32x4d", 32), ("wide_resnet50_2", 32), ("vgg11_bn", 32), ("alexnet", 64),
    ("densenet121", 32), ("inception_v3", 75), ("googlenet", 64), ("squeezenet1_1", 64), ("shufflenet_v2_x0_5", 64),
    ("mnasnet0_5", 64), ("mobilenet_v3_small", 64), ("efficientnet_v2_s", 64), ("regnet_y_400mf", 64),
    ("convnext_tiny", 32), ("swin_v2_t", 64), ("maxvit_t", 224), ("vit_b_16", 32)]},
    **{name: ("segmentation", 32) for name in ["fcn_resnet50", "deeplabv3_mobilenet_v3_large",
                                                     "lraspp_mobilenet_v3_large"]},
    **{name: ("video", 32) for name in ["r3d_18", "r2plus1d_18", "mc3_18"]}}


def _timm(spec: str):
    """``name`` or ``name:size``: the model, its batch, no loss of its own (cross-entropy)."""
    import timm

    name, _, size = spec.partition(":")
    size = int(size or 64)
    torch.manual_seed(0)
    options = {} if name.startswith(FIXED_SIZE) else {"img_size": size}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=3, **options)
    except TypeError:  # a model without img_size= (the convnets)
        model = timm.create_model(name, pretrained=False, num_classes=3)
    return name, model, (3, size, size), None


def _segmentation_loss(outputs, batch):
    return F.cross_entropy(outputs["out"], batch[1])


def _torchvision(spec: str):
    import torchvision.models as tv

    torch.manual_seed(0)
    kind, size = TORCHVISION[spec]
    builder = getattr(tv.segmentation if kind == "segmentation" else tv.video if kind == "video" else tv, spec)
    options = {"weights_backbone": None} if kind == "segmentation" else {}
    options.update({"aux_logits": True, "init_weights": True} if spec in ("inception_v3", "googlenet") else {})
    options.update({"image_size": size} if spec.startswith("vit_") else {})
    model = builder(num_classes=3, **options)
    shape = (3, 4, size, size) if kind == "video" else (3, size, size)
    return spec, model, shape, _segmentation_loss if kind == "segmentation" else None


def check(spec: str, family: str = "timm") -> dict:
    """One model against the loop."""
    name, model, shape, loss = (_timm if family == "timm" else _torchvision)(spec)
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    batch = (x, torch.randint(0, 3, (3, *shape[-2:]) if loss is not None else (3,), generator=g))
    options = {"loss": loss} if loss is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "vmap cannot run ... the loop computes them" notices
        t0 = time.perf_counter()
        est, fell = hooks_and_fallen(model, batch, chunk_size=3, **options)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # with the first call's decisions (its one-off checks run the loop on 2 samples)
        hooks_and_fallen(model, batch, chunk_size=3, **options)
        hooks_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = gradsel.fisher(model, batch, engine="loop", progress=False, **options)
        loop_s = time.perf_counter() - t0
        auto = gradsel.fisher(model, batch, chunk_size=3, progress=False, **options)  # the default engine
    overall = max(float(r.abs().max()) for r in ref.values())
    if not overall > 0:  # torchvision's Inception v3 at random: logits of 1e7, the labels their argmax, a loss of 0
        raise ValueError("the loop's Fisher is zero everywhere: the random model's logits saturate on these labels")

    def errors(got):
        return {k: float((got[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 1e-10 * overall) for k in ref}

    hooks_err, auto_err = errors(est), errors(auto)
    at = max(hooks_err, key=hooks_err.get)
    return {"model": name, "input": "×".join(map(str, shape[1:])), "tensors": len(ref), "fallback tensors": len(fell),
            "largest error": hooks_err[at], "at": at, "exact": hooks_err[at] <= 1e-8,
            "default engine: largest error": max(auto_err.values()), "default engine": auto.engine,
            "hooks, first call (s)": first_s, "hooks (s)": hooks_s, "loop (s)": loop_s,
            "left to the fallback (first 3)": ", ".join(sorted(fell)[:3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["timm", "torchvision"], default="timm")
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args()
    default = MODELS if args.family == "timm" else list(TORCHVISION)
    args.models = args.models or default
    rows = []
    for spec in tqdm(args.models, unit="model", desc="sweep"):
        try:
            rows.append(check(spec, args.family))
        except Exception as exc:  # noqa: BLE001 (a model that cannot be built or run here is reported, not fatal)
            rows.append({"model": spec, "exact": f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        tqdm.write(str(rows[-1]))
    command = "python -m benchmarks.fisher_sweep" + (" --family torchvision" if args.family != "timm" else "")
    if args.models != default:
        command += " --models " + " ".join(args.models)
    write("fisher_sweep" + ("" if args.family == "timm" else "_" + args.family), rows,
          render(rows, args.family, command))


def render(rows: list[dict], family: str, command: str) -> str:
    ran = [r for r in rows if "largest error" in r]
    exact = sum(r["exact"] is True for r in ran)
    clean = sum(r["exact"] is True and r["fallback tensors"] == 0 for r in ran)
    worst = max(ran, key=lambda r: r["largest error"], default={"largest error": float("nan"), "model": "none ran"})
    not_run = f"; {len(rows) - len(ran)} not run (below)" if len(ran) < len(rows) else ""
    return (f"# The hooks engine against the loop on {len(rows)} {family} architectures (float64)\n\n"
            f"Machine: {machine()}. Command: `{command}`. Random weights, eval mode, 3 images, one chunk; error ÷ "
            f"each tensor's largest loop entry, tolerance 1e-8.\n\n**{exact} of {len(ran)} run exact** (largest error "
            f"anywhere {worst['largest error']:.2g}, {worst['model']}); {clean} with no tensor left to the "
            f"fallback{not_run}.\n\n" + md_table(rows, COLUMNS) + "\n")


if __name__ == "__main__":
    main()
