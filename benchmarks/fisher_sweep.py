"""The hooks engine against the batch-of-one loop in float64 on many timm architectures: is it exact, and
what does it leave to the fallback?

Run: ``python -m benchmarks.fisher_sweep [--models resnet18 deit_tiny_patch16_224:64 ...]``. Writes
``benchmarks/results/fisher_sweep.md``. Each model: random weights, eval mode, float64, 3 random images at the
size given after the colon (64 by default; models that fix their resolution get theirs), one chunk of 3. *largest
error*: over the candidate tensors, ``max |hooks − loop|`` ÷ that tensor's largest loop entry (floored at 1e-10 of
the model's largest, so that a tensor zero by structure compares its rounding with the model's scale), the
tolerance of ``tests/test_engines.py``: 1e-8. *fallback tensors*: those the per-layer rules and local gradients
left to the whole-model fallback (vmap, or the loop where vmap cannot run). Times are one call each, float64 on
the threads given, for orientation only (``fisher_zoo`` measures speed): the engine's first call on a model runs its
one-off checks (batch-of-one forwards, and each local gradient against the loop on 2 samples), which cost about as
much as the loop over these 3 samples; *hooks* is the second call, which keeps the first one's decisions.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
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
COLUMNS = ["model", "input", "tensors", "fallback tensors", "largest error", "at", "exact", "hooks, first call (s)",
           "hooks (s)", "loop (s)", "left to the fallback (first 3)"]


def check(spec: str) -> dict:
    """One model against the loop (``name`` or ``name:size``)."""
    import timm

    name, _, size = spec.partition(":")
    size = int(size or 64)
    torch.manual_seed(0)
    options = {} if name.startswith(FIXED_SIZE) else {"img_size": size}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=3, **options)
    except TypeError:  # a model without img_size= (the convnets)
        model = timm.create_model(name, pretrained=False, num_classes=3)
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(3, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's "vmap cannot run ... the loop computes them" notices
        t0 = time.perf_counter()
        est, fell = hooks_and_fallen(model, batch, chunk_size=3)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # with the first call's decisions (its one-off checks run the loop on 2 samples)
        hooks_and_fallen(model, batch, chunk_size=3)
        hooks_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = gradsel.fisher(model, batch, engine="loop", progress=False)
        loop_s = time.perf_counter() - t0
    overall = max(float(r.abs().max()) for r in ref.values())
    errors = {k: float((est[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 1e-10 * overall) for k in ref}
    at = max(errors, key=errors.get)
    return {"model": name, "input": f"{size}²", "tensors": len(ref), "fallback tensors": len(fell),
            "largest error": errors[at], "at": at, "exact": errors[at] <= 1e-8, "hooks, first call (s)": first_s,
            "hooks (s)": hooks_s,
            "loop (s)": loop_s, "left to the fallback (first 3)": ", ".join(sorted(fell)[:3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    rows = []
    for spec in tqdm(args.models, unit="model", desc="sweep"):
        try:
            rows.append(check(spec))
        except Exception as exc:  # noqa: BLE001 (a model that cannot be built or run here is reported, not fatal)
            rows.append({"model": spec, "exact": f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        tqdm.write(str(rows[-1]))
    exact = sum(r.get("exact") is True for r in rows)
    clean = sum(r.get("exact") is True and r.get("fallback tensors") == 0 for r in rows)
    worst = max((r for r in rows if "largest error" in r), key=lambda r: r["largest error"])
    command = "python -m benchmarks.fisher_sweep"
    if args.models != MODELS:
        command += " --models " + " ".join(args.models)
    md = (f"# The hooks engine against the loop on {len(rows)} timm architectures (float64)\n\nMachine: {machine()}. "
          f"Command: `{command}`. Random weights, eval mode, 3 images, one chunk; error ÷ each tensor's largest "
          f"loop entry, tolerance 1e-8.\n\n**{exact} of {len(rows)} exact** (largest error anywhere "
          f"{worst['largest error']:.2g}, {worst['model']}); {clean} with no tensor left to the fallback.\n\n"
          + md_table(rows, COLUMNS) + "\n")
    write("fisher_sweep", rows, md)


if __name__ == "__main__":
    main()
