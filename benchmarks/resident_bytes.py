"""Resident bytes of the native kernels' weights against the stored ones, per format, on the default model: what a
quantized model holds in memory while it runs (codes, scales, offsets, and what `restore` needs to give back the
stored tensors exactly), in bits per decoder weight.

Every decoder Linear of the default model is quantized to the format (round-to-nearest) and put on its kernel
(`QuantLinear`, kernel "auto"). "resident" counts every tensor the layers hold; "stored" the format's own
tensors (what a checkpoint or GGUF file holds for them). The "float32 scales" column repeats the count with the
kernels' scales and offsets kept in float32 (how they were resident before 16-bit and two-level ones), for
comparison.

    python benchmarks/resident_bytes.py                      # about a minute
    python benchmarks/resident_bytes.py --quick --out DIR    # two formats: keeps the script alive
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import lowbit
from lowbit.eval import environment
from lowbit.io.atomic import atomic_write_text
from lowbit.kernels import native_int4
from lowbit.nn import QuantLinear

FORMATS = {"int4 g64 (symmetric, the default)": dict(bits=4, group_size=64),
           "int4 g64 asymmetric": dict(bits=4, group_size=64, symmetric=False),
           "int8 per channel": dict(bits=8, group_size=-1), "int5 g64": dict(bits=5, group_size=64),
           "int3 g64": dict(bits=3, group_size=64), "int2 g64": dict(bits=2, group_size=64),
           "int4 g32, two-level 6-bit scales per row": dict(bits=4, group_size=32, scale_bits=6, super_block=-1),
           "int4 g32 asymmetric, two-level 6-bit scales per row": dict(bits=4, group_size=32, symmetric=False,
                                                                        scale_bits=6, super_block=-1),
           **{f"GGUF {t}": dict(gguf_type=t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                                     "Q6_K")}}


def count(model) -> dict:
    resident = stored = weights = 0
    kernels = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            kernels.add(mod.kernel.name)
            resident += sum(t.numel() * t.element_size() for t in mod._buffers.values())
            qt = mod.quantized_tensor()
            stored += sum(t.numel() * t.element_size() for t in (qt.qweight, qt.scales, qt.zeros) if t is not None)
            weights += mod.in_features * mod.out_features
    return {"kernels": sorted(kernels), "resident_bits": 8 * resident / weights, "stored_bits": 8 * stored / weights,
            "weights": weights}


def measure(fmt: dict, float32_scales: bool) -> dict:
    model = lowbit.load_model("default").model
    keep = mock.patch.object(native_int4, "resident_scales", lambda s, o: (s, o)) if float32_scales else nullcontext()
    flat = mock.patch.object(native_int4, "two_level_scales", lambda s, o, rest: None) if float32_scales else nullcontext()
    with keep, flat:
        lowbit.quantize(model, lowbit.RTN(**fmt), progress=False)
    return count(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/resident_bytes")
    args = ap.parse_args()
    names = list(FORMATS)[:2] if args.quick else list(FORMATS)
    rows = []
    for name in names:
        now, before = measure(FORMATS[name], False), measure(FORMATS[name], True)
        rows.append({"format": name, **now, "float32_scales_bits": before["resident_bits"]})
        print(json.dumps(rows[-1]), flush=True)
    env = environment()
    md = (f"{env.get('cpu')}, torch {env.get('torch')}; the default model's {rows[0]['weights'] / 1e6:.1f}M decoder "
          "weights, bits per weight\n\n| format | kernel | stored | resident | resident with float32 scales |\n"
          "|---|---|---|---|---|\n" + "".join(
              f"| {r['format']} | {', '.join(r['kernels'])} | {r['stored_bits']:.3f} | {r['resident_bits']:.3f} | "
              f"{r['float32_scales_bits']:.3f} |\n" for r in rows))
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"machine": env, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
