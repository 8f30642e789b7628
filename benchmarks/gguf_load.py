"""How long a GGUF file takes to parse and to load, with gguf-py's reader and with lowbit's (lowbit.io.gguf_reader:
the same reader slicing a plain array view of the mapped file), alternating in one process.

For each round and reader: one parse of the file (gguf.GGUFReader's constructor: the header, the metadata, the
tensor table) and one `lowbit.load_model(FILE, cache=False)` (the file checked, transformers' config, tokenizer
and weights, with no float copy from an earlier load). The fields of both readers are compared too.

    python benchmarks/gguf_load.py [--file default] [--rounds 3] [--out benchmarks/results/gguf_load]
    python benchmarks/gguf_load.py --quick --out DIR      # one round: keeps the script alive
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from results_files import write_results


def same_fields(a, b) -> bool:
    import numpy as np
    return list(a.fields) == list(b.fields) and all(
        len(f.parts) == len(b.fields[k].parts)
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(f.parts, b.fields[k].parts))
        for k, f in a.fields.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default="default", help="a GGUF file, or default (the default model's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gguf_load")
    args = p.parse_args()
    from importlib.metadata import version

    import gguf

    import lowbit
    from lowbit.eval import environment
    from lowbit.io import gguf_reader
    from lowbit.models.sources import resolve_source

    path = str(resolve_source(args.file))
    readers = {"gguf-py": gguf.GGUFReader, "lowbit": gguf_reader.GGUFReader}
    same = same_fields(readers["gguf-py"](path), readers["lowbit"](path))
    lowbit.load_model(path, cache=False)   # imports done and the file in the page cache before any timing
    times = {name: {"parse_s": [], "load_s": []} for name in readers}
    for r in range(1 if args.quick else args.rounds):
        for name, cls in readers.items():
            gguf_reader.GGUFReader = cls     # what lowbit's loads construct
            t = time.perf_counter()
            cls(path)
            times[name]["parse_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            lowbit.load_model(path, cache=False)
            times[name]["load_s"].append(time.perf_counter() - t)
            print(f"round {r}: {name:<8} parse {times[name]['parse_s'][-1]:.2f} s, "
                  f"load {times[name]['load_s'][-1]:.2f} s", flush=True)
    gguf_reader.GGUFReader = readers["lowbit"]
    env = environment()
    lines = [f"GGUF file: {Path(path).name} ({Path(path).stat().st_size / 1e6:.1f} MB); same fields: {same}",
             f"CPU: {env.get('cpu', '?')} ({env.get('cpu_features', '')}), {env.get('torch_threads')} threads; torch {env.get('torch', '?')}; gguf {version('gguf')}", "",
             "| reader | parse s (rounds) | median | load_model(cache=False) s (rounds) | median |",
             "|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {' '.join(f'{x:.2f}' for x in t['parse_s'])} | {statistics.median(t['parse_s']):.2f} "
                     f"| {' '.join(f'{x:.2f}' for x in t['load_s'])} | {statistics.median(t['load_s']):.2f} |")
    write_results(args.out, "\n".join(lines), {"file": Path(path).name, "source": args.file, "same_fields": same,
                                               "times": times, "environment": env})


if __name__ == "__main__":
    main()
