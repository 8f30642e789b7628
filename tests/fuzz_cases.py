"""Seeded fault cases for lowbit's readers and writers: damaged files and interrupted or starved writes.

Shared by tests/test_fuzz.py (a few seeds, in the default run) and benchmarks/reliability.py (many seeds, writes
RELIABILITY.md). Every case class is a function `(fx, rng) -> [(label, failure or None)]`: it builds its damaged
inputs from `random.Random(seed)` (so a case is reproduced by its class and seed), feeds them to the real
loader or writer and judges the outcome against lowbit's promise for bad input:

- a clean error: `LowbitError` from the library, one line `lowbit: error: ...` and exit status 2 from the CLI;
- or an identical result (a damaged byte the format does not depend on, such as JSON whitespace);
- never another exception type, never a hang, never a partial output.

A bit flip inside float data cannot be told apart from a real weight by any header check, so for flips in a data
region the accepted outcomes are a clean error or a successful load whose weights are all finite (lowbit refuses
NaN/Inf weights: a flip that makes one must be refused).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lowbit
from lowbit.io.safetensors import INDEX, check_safetensors, read_header

CASE_SECONDS = 60   # a case that runs longer than this counts as a hang
PYTHON = sys.executable


# --------------------------------------------------------------------------------------------- judging outcomes

class Hang(Exception):
    pass


def attempt(fn, seconds: float = CASE_SECONDS):
    """("ok", value), ("error", message) for a LowbitError, or ("crash", what) for anything else, a hang included."""
    def alarm(*_):
        raise Hang(f"no answer after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return "ok", fn()
    except lowbit.LowbitError as e:
        return "error", str(e)
    except Exception as e:  # noqa: BLE001 - any other type is exactly what the harness looks for
        return "crash", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """lowbit.cli.main in this process: (exit status, stderr)."""
    from lowbit.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def cli_verdict(code: int, stderr: str, out: Path | None = None) -> str | None:
    """None when the CLI kept its promise: exit 0 with its output, or exit 2 with one error line and no output."""
    # progress bars share stderr (and end in carriage returns): the error must be its one last line
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "Traceback" in ln]
    if code == 0:
        return None if out is None or out.exists() else "exit 0 without output"
    if code != 2 or len(errors) != 1 or errors[0] != lines[-1] or not lines[-1].startswith("lowbit: error: ") \
            or "a bug in lowbit" in lines[-1]:
        return f"exit {code}, stderr {stderr.strip()[-300:]!r}"
    if out is not None and (out.exists() or leftovers(out)):
        return f"error but output left behind: {sorted(p.name for p in out.parent.iterdir())}"
    return None


def leftovers(out: Path) -> list[Path]:
    """Entries beside `out` that belong to a write of it (its temporary names)."""
    return sorted(out.parent.glob(f".{out.name}.*"))


def logits(model) -> torch.Tensor:
    ids = torch.arange(12).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        return model(ids).logits


def all_finite(model) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def judge_load(kind: str, fn, reference: torch.Tensor) -> str | None:
    """A loader's outcome on a damaged input. `kind` "data": success must only have finite weights;
    otherwise success must give the reference logits exactly."""
    status, value = attempt(fn)
    if status == "crash":
        return value
    if status == "error":
        return None
    model = value.model
    if kind == "data":
        return None if all_finite(model) else "loaded NaN/Inf weights"
    return None if torch.equal(logits(model), reference) else "loaded, but not the same model"


# ------------------------------------------------------------------------------------------------ fixtures

@dataclass
class Fixtures:
    """Small, valid inputs to damage: a tiny Hugging Face directory, its lowbit checkpoint (one file and
    sharded), a small GGUF file, and the logits each loads to."""
    root: Path
    tiny: Path
    ckpt: Path
    sharded: Path
    gguf: Path
    offload: Path        # a checkpoint whose blocks are large beside its embedding, and a budget that streams them
    budget: int
    tiny_logits: torch.Tensor
    ckpt_logits: torch.Tensor
    counter: list = field(default_factory=lambda: [0])

    def scratch(self, name: str) -> Path:
        self.counter[0] += 1
        d = self.root / f"case-{self.counter[0]}-{name}"
        d.mkdir(parents=True)
        return d


def make_tiny_dir(out: Path, tokenizer, seed: int = 1, layers: int = 2, intermediate: int = 128) -> Path:
    """A tiny random llama directory (blocks of width 64) with `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                      max_position_embeddings=512)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def shard_checkpoint(src: Path, out: Path) -> Path:
    """The checkpoint at `src` with its tensors split over two shards and an index."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001.safetensors": names[::2], "model-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard), metadata={"format": "pt"})
    (out / INDEX).write_text(json.dumps({"weight_map": {k: s for s, ks in halves.items() for k in ks}}))
    return out


def make_gguf(out: Path) -> Path:
    """A small GGUF file: llama metadata and a few float tensors (not a loadable model: every load ends in
    a clean error, which is the outcome its damaged copies are held to)."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_string("general.name", "fuzz")
    rng = np.random.default_rng(0)
    for name, shape in [("token_embd.weight", (32, 16)), ("blk.0.attn_q.weight", (16, 16)),
                        ("output_norm.weight", (16,))]:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def make_fixtures(root: Path, tokenizer) -> Fixtures:
    root.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_dir(root / "tiny", tokenizer)
    loaded = lowbit.load_model(tiny)
    ref = logits(loaded.model)
    lowbit.quantize(loaded.model, lowbit.RTN(bits=4, group_size=32), progress=False)
    ckpt = lowbit.save_checkpoint(loaded.model, loaded.tokenizer, root / "ckpt", base=str(tiny))
    ckpt_ref = logits(lowbit.load_checkpoint(ckpt).model)
    big = lowbit.load_model(make_tiny_dir(root / "tiny-4", tokenizer, layers=4, intermediate=2048))
    lowbit.quantize(big.model, lowbit.RTN(bits=4, group_size=32), progress=False)
    offload = lowbit.save_checkpoint(big.model, big.tokenizer, root / "offload-src", base=str(tiny))
    return Fixtures(root, tiny, ckpt, shard_checkpoint(ckpt, root / "sharded"), make_gguf(root / "small.gguf"),
                    offload, streaming_budget(big.model), ref, ckpt_ref)


def streaming_budget(model) -> int:
    """Bytes of everything outside the blocks plus 2.5 blocks, counted as the offload planner counts them (the
    tensors the kernels keep resident, which may exceed what is stored): the planner must stream some blocks."""
    blocks = model.model.layers
    tensors = lambda m: list(m.parameters()) + list(m.buffers())   # noqa: E731
    block = sum(t.numel() * t.element_size() for t in tensors(blocks[0]))
    inside = {t.data_ptr() for t in tensors(blocks)}
    seen, fixed = set(), 0
    for t in tensors(model):
        if t.data_ptr() not in inside and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            fixed += t.numel() * t.element_size()
    return int(fixed + 2.5 * block)


def variant(src: Path, into: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of directory `src` (files linked, not copied) with some files replaced (None: removed)."""
    for p in src.iterdir():
        if p.name not in replace:
            os.symlink(p.resolve(), into / p.name)
    for name, data in replace.items():
        if data is not None:
            (into / name).write_bytes(data)
    return into


# ------------------------------------------------------------------------------------------------ mutations

def flip(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    """`data` with one random bit flipped in [lo, hi)."""
    pos = rng.randrange(lo, hi)
    b = bytearray(data)
    b[pos] ^= 1 << rng.randrange(8)
    return bytes(b)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict | bytes, body: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


SAME_SIZE = {"F32": "I32", "I32": "F32", "F16": "BF16", "BF16": "F16"}   # reinterprets the bytes


def safetensors_mutations(data: bytes, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(label, kind, damaged bytes): kind "data" for flips inside tensor data, "header" otherwise."""
    n = struct.unpack("<Q", data[:8])[0]
    header, body = split_safetensors(data)
    names = sorted(k for k in header if k != "__metadata__")
    name, other = rng.choice(names), rng.choice(names)

    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h[name], h)
        return join_safetensors(h, body)

    cut = rng.randrange(len(data))
    return [
        (f"truncated at {cut}", "header", data[:cut]),
        ("bit flip in the header length", "header", flip(data, 0, 8, rng)),
        ("bit flip in the header", "header", flip(data, 8, 8 + n, rng)),
        ("bit flip in the header", "header", flip(data, 8, 8 + n, rng)),
        ("bit flip in the data", "data", flip(data, 8 + n, len(data), rng)),
        ("byte set to 0xff in the data", "data", data[:(p := rng.randrange(8 + n, len(data)))] + b"\xff" + data[p + 1:]),
        ("wrong dtype string", "header", edit(lambda e, h: e.update(dtype=rng.choice(["F33", "f32", "", "I4", 7, None])))),
        ("same-size dtype", "data", edit(lambda e, h: e.update(dtype=SAME_SIZE.get(e["dtype"], "U8")))),
        ("wrong shape", "header", edit(lambda e, h: e.update(shape=rng.choice([[], [0], [-1], [2 ** 62, 2 ** 62], "64", [1.5]])))),
        ("offsets past the end", "header", edit(lambda e, h: e.update(data_offsets=[len(body) - 4, len(body) + rng.randrange(4, 1 << 20)]))),
        ("overlapping offsets", "header", edit(lambda e, h: e.update(data_offsets=h[other]["data_offsets"]))),
        ("non-JSON header", "header", join_safetensors(bytes(rng.randrange(256) for _ in range(n)), body)),
        ("huge header length", "header", struct.pack("<Q", rng.choice([2 ** 63, 2 ** 64 - 1, len(data) + 1])) + data[8:]),
        ("header not an object", "header", join_safetensors(json.dumps([header]).encode(), body)),
    ]


# ------------------------------------------------------------------------------------------------ case classes

def safetensors_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """A tiny HF directory's model.safetensors damaged: read_header/check_safetensors, then load_model."""
    data = (fx.tiny / "model.safetensors").read_bytes()
    out = []
    for label, kind, damaged in safetensors_mutations(data, rng):
        d = variant(fx.tiny, fx.scratch("st"), {"model.safetensors": damaged})
        st = d / "model.safetensors"
        status, value = attempt(lambda: (read_header(st), check_safetensors(st)))
        failure = value if status == "crash" else judge_load(kind, lambda: lowbit.load_model(d), fx.tiny_logits)
        out.append((label, failure))
    return out


def cli_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """The CLI on one damaged safetensors file: exit 2 with one error line and no output, or a full output."""
    data = (fx.tiny / "model.safetensors").read_bytes()
    label, _, damaged = rng.choice(safetensors_mutations(data, rng))
    d = variant(fx.tiny, fx.scratch("cli"), {"model.safetensors": damaged})
    out = d.parent / (d.name + "-out")
    status, value = attempt(lambda: run_cli(["quantize", d, "--bits", "4", "--group-size", "32", "--out", out]))
    return [(f"quantize, {label}", value if status != "ok" else cli_verdict(*value, out))]


def record_mutations(record: dict, rng: random.Random) -> list[tuple[str, object]]:
    """(label, damaged lowbit.json as an object, or bytes for raw damage)."""
    def edited(fn):
        r = json.loads(json.dumps(record))
        fn(r)
        return r
    module = rng.choice(sorted(record["modules"]))
    field_ = rng.choice(sorted(record["modules"][module]))
    top = rng.choice(sorted(record))
    junk = lambda: rng.choice([None, 1, -1, "x", [], {}, 1e308, True, 10 ** 30, [1, 2]])  # noqa: E731
    raw = json.dumps(record).encode()
    return [
        (f"top-level key {top!r} dropped", edited(lambda r: r.pop(top))),
        (f"module field {field_!r} dropped", edited(lambda r: r["modules"][module].pop(field_))),
        (f"top-level {top!r} of another type", edited(lambda r: r.update({top: junk()}))),
        (f"module field {field_!r} of another type", edited(lambda r: r["modules"][module].update({field_: junk()}))),
        ("unknown format kind", edited(lambda r: r["modules"][module].update(kind=rng.choice(["int99", "gguf", "", "__class__"])))),
        ("module that does not exist", edited(lambda r: r["modules"].update({rng.choice(
            ["model.layers.99.mlp.up_proj", "model.embed_tokens", "model.norm", "", "lm_head.weight", "..",
             "model.layers.-1"]): r["modules"].pop(module)}))),
        ("dtype string", edited(lambda r: r.update(dtype=rng.choice(["float64", "int8", "torch.float32", "__class__", "", None, 3])))),
        ("huge numbers", edited(lambda r: r["modules"][module].update(
            {rng.choice(["bits", "group_size"]): rng.choice([10 ** 30, 2 ** 63, -(10 ** 30), 1e308, 0])}))),
        ("format version", edited(lambda r: r.update(format_version=rng.choice(["1", 10 ** 30, -1, None, [1], 1.5])))),
        ("tied map damaged", edited(lambda r: r.update(tied=rng.choice([[], "x", {"lm_head.weight": "nope.weight"}, {"x": "y"}])))),
        ("truncated", raw[:rng.randrange(len(raw))]),
        ("bit flip", flip(raw, 0, len(raw), rng)),
    ]


def record_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """A checkpoint's lowbit.json damaged: load_checkpoint."""
    record = json.loads((fx.ckpt / "lowbit.json").read_text())
    out = []
    for label, damaged in record_mutations(record, rng):
        data = damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode()
        d = variant(fx.ckpt, fx.scratch("rec"), {"lowbit.json": data})
        out.append((label, judge_load("header", lambda: lowbit.load_checkpoint(d), fx.ckpt_logits)))
    return out


def checkpoint_tensor_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """A checkpoint's model.safetensors damaged (truncations, bit flips, header edits): load_checkpoint."""
    data = (fx.ckpt / "model.safetensors").read_bytes()
    out = []
    for label, kind, damaged in rng.sample(safetensors_mutations(data, rng), 7):
        d = variant(fx.ckpt, fx.scratch("ckst"), {"model.safetensors": damaged})
        out.append((label, judge_load(kind, lambda: lowbit.load_checkpoint(d), fx.ckpt_logits)))
    return out


def index_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """A sharded checkpoint's index damaged: shards outside the directory, missing, misassigned; load_checkpoint."""
    index = json.loads((fx.sharded / INDEX).read_text())
    wm = index["weight_map"]
    name = rng.choice(sorted(wm))
    shard = wm[name]
    other = next(s for s in sorted(set(wm.values())) if s != shard)

    def edited(fn):
        m = dict(wm)
        fn(m)
        return json.dumps({"weight_map": m}).encode()
    cases = [
        ("shard named with ../", {INDEX: edited(lambda m: m.update({name: "../" + shard}))}),
        ("absolute shard path", {INDEX: edited(lambda m: m.update({name: str((fx.sharded / shard).resolve())}))}),
        ("missing shard", {shard: None}),
        ("tensor listed in the wrong shard", {INDEX: edited(lambda m: m.update({name: other}))}),
        ("tensor left out of the index", {INDEX: edited(lambda m: m.pop(name))}),
        ("shard name not a string", {INDEX: edited(lambda m: m.update({name: rng.choice([1, None, [], {}])}))}),
        ("index not JSON", {INDEX: flip(b"{\"weight_map\": {}}", 0, 16, rng)[:rng.randrange(1, 16)]}),
        ("weight_map not a table", {INDEX: json.dumps({"weight_map": rng.choice([[], "x", 1, None])}).encode()}),
        ("empty shard name", {INDEX: edited(lambda m: m.update({name: ""}))}),
        ("shard truncated", {shard: (fx.sharded / shard).read_bytes()[:rng.randrange(1, (fx.sharded / shard).stat().st_size)]}),
    ]
    out = []
    for label, replace in cases:
        d = variant(fx.sharded, fx.scratch("idx"), replace)
        out.append((label, judge_load("header", lambda: lowbit.load_checkpoint(d), fx.ckpt_logits)))
    return out


def gguf_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """A small GGUF file truncated and bit-flipped (header, tensor table, data): load_model without the cache."""
    data = fx.gguf.read_bytes()
    import gguf
    data_start = gguf.GGUFReader(str(fx.gguf)).tensors[0].data_offset
    cases = [
        (f"truncated at {(c := rng.randrange(len(data)))}", data[:c]),
        ("bit flip in the fixed header", flip(data, 4, 24, rng)),
        ("bit flip in metadata/tensor table", flip(data, 24, data_start, rng)),
        ("bit flip in metadata/tensor table", flip(data, 24, data_start, rng)),
        ("bit flip in the data", flip(data, data_start, len(data), rng)),
    ]
    out = []
    for label, damaged in cases:
        p = fx.scratch("gguf") / "m.gguf"
        p.write_bytes(damaged)
        status, value = attempt(lambda: lowbit.load_model(p, cache=False))
        out.append((label, value if status == "crash" else None))
    return out


def default_gguf_cases(fx: Fixtures, rng: random.Random, flips: bool = False) -> list[tuple[str, str | None]]:
    """The default model's GGUF cut to its first few MB (and, with `flips`, whole copies with a bit flipped in
    its header: each such load takes the full ~10 s)."""
    src = lowbit.models.default_model_path()
    with open(src, "rb") as f:
        head = f.read(8 << 20)
    cases = [(f"default GGUF truncated at {(c := rng.randrange(len(head)))}", head[:c])]
    if flips:
        import gguf
        start = gguf.GGUFReader(str(src)).tensors[0].data_offset
        cases.append(("default GGUF, bit flip in its header", flip(src.read_bytes(), 4, start, rng)))
    out = []
    for label, damaged in cases:
        p = fx.scratch("dgguf") / "m.gguf"
        p.write_bytes(damaged)
        status, value = attempt(lambda: lowbit.load_model(p, cache=False), seconds=120)
        out.append((label, value if status == "crash" else None))
        p.unlink()
    return out


RECIPE_RULES = [{"match": "model.layers.0.*", "keep": True},
                {"match": "*.self_attn.*", "bits": 8, "group_size": -1},
                {"match": "re:.*\\.mlp\\..*", "bits": 4, "group_size": 32, "symmetric": False}]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, int) or v == v and abs(v) != float("inf") else "nan"
    if isinstance(v, str):
        return json.dumps(v)   # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(rules: list) -> str:
    out = []
    for r in rules:
        if not isinstance(r, dict):
            return f"rule = {toml_value(rules)}\n"   # not tables: written as an inline array
        out.append("[[rule]]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in r.items()))
    return "\n".join(out)


def recipe_mutations(rng: random.Random) -> list[tuple[str, list]]:
    def edited(fn):
        rules = json.loads(json.dumps(RECIPE_RULES))
        fn(rules, rng.randrange(len(rules)))
        return rules
    junk = lambda: rng.choice([1, -3, "4", "", [], [1, "x"], {"a": 1}, True, 1.5, 10 ** 18])  # noqa: E731
    key = rng.choice(["match", "keep", "method", "bits", "group_size", "symmetric", "kernel", "options", "kind", "fmt"])
    return [
        (f"{key!r} of another type", edited(lambda rs, i: rs[i].update({key: junk()}))),
        ("unknown key", edited(lambda rs, i: rs[i].update({rng.choice(["bitz", "", "Match", "group-size"]): 1}))),
        ("invalid regex", edited(lambda rs, i: rs[i].update(match=rng.choice(["re:(", "re:[a-", "re:*x", "re:(?P<", "re:a{2,1}"])))),
        ("huge pattern", edited(lambda rs, i: rs[i].update(match=rng.choice(["re:", ""]) + "a" * rng.choice([10 ** 5, 10 ** 6])))),
        ("options not a table", edited(lambda rs, i: rs[i].update(options=rng.choice(["x", [1], 3, True])))),
        ("options with unknown names", edited(lambda rs, i: rs[i].update(method="gptq", options={"act_ordr": True}))),
        ("rule not a table", edited(lambda rs, i: rs.__setitem__(i, rng.choice(["x", 1, [1, 2], True])))),
        ("unknown method", edited(lambda rs, i: rs[i].update(method=rng.choice(["rtm", "", "GPTQ!", "__init__"])))),
    ]


def recipe_cases(fx: Fixtures, rng: random.Random) -> list[tuple[str, str | None]]:
    """Recipe files (TOML and JSON) with fields of other types, unknown keys, bad regexes, huge patterns, raw
    damage: Recipe.from_file, then the recipe's plan for a tiny model."""
    model = _tiny_model(fx)
    files = []
    for label, rules in recipe_mutations(rng):
        files.append((f"JSON, {label}", ".json", json.dumps({"rules": rules}).encode()))
        files.append((f"TOML, {label}", ".toml", to_toml(rules).encode()))
    good = to_toml(RECIPE_RULES).encode()
    files.append(("TOML truncated", ".toml", good[:rng.randrange(len(good))]))
    files.append(("TOML bit flip", ".toml", flip(good, 0, len(good), rng)))
    files.append(("JSON top level not a table", ".json", json.dumps(rng.choice([1, "x", None, {"rules": 3}])).encode()))
    out = []
    for label, suffix, data in files:
        p = fx.scratch("recipe") / ("r" + suffix)
        p.write_bytes(data)
        status, value = attempt(lambda: lowbit.Recipe.from_file(p, lowbit.RTN(bits=4, group_size=32)).plan(model))
        out.append((label, value if status == "crash" else None))
    return out


_MODELS: dict = {}


def _tiny_model(fx: Fixtures):
    if fx.tiny not in _MODELS:
        _MODELS[fx.tiny] = lowbit.load_model(fx.tiny).model
    return _MODELS[fx.tiny]


# ------------------------------------------------------------------------------------------------ kill -9

SAVE_SCRIPT = """
import sys, lowbit
loaded = lowbit.load_model(sys.argv[1])
lowbit.quantize(loaded.model, lowbit.RTN(bits=4, group_size=32), progress=False)
lowbit.save_checkpoint(loaded.model, loaded.tokenizer, sys.argv[2], overwrite=True)
"""


def writer_command(fx: Fixtures, what: str, out: Path) -> list[str]:
    """The child process that writes `out`: the CLI's quantize, save_checkpoint in a script, or an offloading
    generate (a checkpoint is loaded, so its streamed blocks are written to the offload directory)."""
    if what == "quantize":
        return [PYTHON, "-m", "lowbit.cli", "quantize", str(fx.tiny), "--bits", "4", "--group-size", "32",
                "--out", str(out), "--overwrite"]
    if what == "save":
        return [PYTHON, "-c", SAVE_SCRIPT, str(fx.tiny), str(out)]
    return [PYTHON, "-m", "lowbit.cli", "generate", str(fx.offload), "--prompt", "Hello", "--max-new-tokens", "2",
            "--engine", "eager", "--max-memory", str(fx.budget), "--offload-dir", str(out)]


def complete(what: str, out: Path) -> bool:
    """Whether a published output is whole: a checkpoint that loads, or an offload directory with its manifest."""
    if what == "offload":
        return (out / "offload.json").is_file()
    return (out / "lowbit.json").is_file() and attempt(lambda: lowbit.load_checkpoint(out))[0] == "ok"


def kill_case(fx: Fixtures, what: str, rng: random.Random, full_seconds: float) -> tuple[str, str | None]:
    """Start the writer, SIGKILL it at a random point (a random delay, or just after its temporary output
    appears), then: no output or a complete one, only `.OUT.tmp-PID-*` beside it, and a rerun succeeds and
    removes the dead writer's leftovers."""
    out = fx.scratch(f"kill-{what}") / "OUT"
    env = dict(os.environ, LOWBIT_STRICT_COMPILE="0")
    proc = subprocess.Popen(writer_command(fx, what, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    at_write = rng.random() < 0.5
    delay = rng.uniform(0, 0.05) if at_write else rng.uniform(0.2, 1.0) * full_seconds
    start = time.monotonic()
    if at_write:   # wait for the temporary output, then a few ms more
        while proc.poll() is None and not leftovers(out) and time.monotonic() - start < 120:
            time.sleep(0.002)
        label = f"{what}: killed {delay * 1000:.0f} ms after its temporary output appeared"
    else:
        label = f"{what}: killed after {delay:.2f} s"
    time.sleep(delay if at_write else max(0.0, delay - (time.monotonic() - start)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists() and not complete(what, out):
        return label, "an incomplete output is visible"
    stray = [p.name for p in out.parent.iterdir() if p != out and not p.name.startswith(f".OUT.tmp-{proc.pid}-")]
    if stray:
        return label, f"unexpected entries {stray}"
    status, value = attempt(lambda: rewrite(fx, what, out))
    if status != "ok":
        return label, f"rerun failed: {value}"
    # a finished generate removes its offload directory: there, no output after the rerun is right too
    if leftovers(out) or (out.exists() or what != "offload") and not complete(what, out):
        return label, f"after the rerun: {sorted(p.name for p in out.parent.iterdir())}"
    return label, None


def rewrite(fx: Fixtures, what: str, out: Path) -> None:
    """The killed write done again, in this process (another process id than the dead writer's)."""
    if what == "save":
        loaded = lowbit.load_model(fx.tiny)
        lowbit.quantize(loaded.model, lowbit.RTN(bits=4, group_size=32), progress=False)
        lowbit.save_checkpoint(loaded.model, loaded.tokenizer, out, overwrite=True)
        return
    argv = writer_command(fx, what, out)[3:]
    code, err = run_cli(argv)
    if code != 0:
        raise RuntimeError(err.strip()[-300:])


def writer_seconds(fx: Fixtures, what: str) -> float:
    """How long one uninterrupted write takes (where random kill delays are drawn from)."""
    out = fx.scratch(f"full-{what}") / "OUT"
    start = time.monotonic()
    subprocess.run(writer_command(fx, what, out), check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, LOWBIT_STRICT_COMPILE="0"))
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------------ full disk

@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m"):
    """A freshly mounted tmpfs of `size` at `where`, unmounted after; yields None where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0 or not os.path.ismount(where):
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


FULL_DISK = ("quantize", "save", "offload")


def full_disk_case(fx: Fixtures, disk: Path, what: str) -> tuple[str, str | None]:
    """A write into a file system with 64 KB left: one clear error and nothing left behind."""
    (disk / "filler").unlink(missing_ok=True)
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - (64 << 10)))
    target = disk / what
    try:
        if what == "save":
            loaded = lowbit.load_checkpoint(fx.ckpt)
            status, value = attempt(lambda: lowbit.save_checkpoint(loaded.model, loaded.tokenizer, target))
            failure = value if status == "crash" else ("succeeded on a full disk" if status == "ok" else None)
        else:
            status, value = attempt(lambda: run_cli(writer_command(fx, what, target)[3:]))
            failure = value if status != "ok" else cli_verdict(*value, None)
            if failure is None and value[0] == 0:
                failure = "succeeded on a full disk"
        if failure is None and (target.exists() or leftovers(target)):
            failure = f"left behind {sorted(p.name for p in disk.iterdir())}"
    finally:
        (disk / "filler").unlink(missing_ok=True)
    return f"{what} on a full disk", failure


# ------------------------------------------------------------------------------------------------ the table

CLASSES = {
    "safetensors (HF dir)": (safetensors_cases, "truncation, bit flips in header length/header/data, dtype/shape/offset "
                             "edits, overlapping offsets, non-JSON and huge headers: read_header, check_safetensors, "
                             "load_model; clean error, or identical logits (header) / finite weights (data)"),
    "CLI on damaged files": (cli_cases, "`lowbit quantize` on a damaged safetensors file: exit 2 with one "
                             "`lowbit: error:` line and no output, or exit 0 with the output"),
    "checkpoint lowbit.json": (record_cases, "dropped keys, other types, unknown format kinds, modules that do not "
                               "exist, dtype strings, huge numbers, format version, tied map, truncation, bit "
                               "flips: load_checkpoint; clean error or identical logits"),
    "checkpoint tensors": (checkpoint_tensor_cases, "the checkpoint's safetensors truncated, bit-flipped, header-"
                           "edited: load_checkpoint; clean error, identical logits, or (data) finite weights"),
    "sharded checkpoint index": (index_cases, "shards named with ../ or absolute paths, missing, truncated, a "
                                 "tensor listed in the wrong shard or left out, non-JSON index: load_checkpoint"),
    "GGUF (small file)": (gguf_cases, "a small GGUFWriter file truncated and bit-flipped in its header, metadata, "
                          "tensor table and data: load_model; a clean error, never another type or a hang"),
    "recipe files": (recipe_cases, "TOML and JSON recipes with fields of other types, unknown keys, invalid "
                     "regexes, huge patterns, non-table rules/options, truncation, bit flips: Recipe.from_file "
                     "and its plan"),
}


@dataclass
class Tally:
    """Class -> [tried, passed], and the failures seen (class, seed, label, what happened)."""
    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def record(self, cls: str, seed, results: list[tuple[str, str | None]]) -> list[str]:
        c = self.counts.setdefault(cls, [0, 0])
        failed = []
        for label, failure in results:
            c[0] += 1
            c[1] += failure is None
            if failure is not None:
                self.failures.append((cls, seed, label, failure))
                failed.append(f"{cls} seed {seed}: {label}: {failure}")
        return failed
