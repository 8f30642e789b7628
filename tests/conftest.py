import copy
import json
import os
import shutil
from pathlib import Path

import pytest

# The default run spreads the tests over worker processes (pytest-xdist, `-n auto` in pyproject.toml): most tests
# are Python-bound or compile small graphs, which one core each runs as fast as two, so two workers on two
# cores finish the run in about 0.6 of the time. Each worker gets its share of the cores for its matrix
# products (more threads than cores make OpenMP's waiting threads spin against each other); subprocesses the
# tests start inherit the same share. A thread count the caller set is kept.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // WORKERS)))

import torch  # noqa: E402

if not torch.cuda.is_available():   # Triton picks compiling or interpreting when lowbit's kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
import lowbit  # noqa: E402

torch.manual_seed(0)
if WORKERS > 1 and os.environ["OMP_NUM_THREADS"].isdigit():   # in case torch was imported before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("LOWBIT_STRICT_COMPILE", "1")   # a compiled engine that fails must fail the test, not go eager


@pytest.hookimpl(optionalhook=True)   # pytest-xdist's hook: pytest without the plugin does not know it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (each holds the default model and its copies: 1.3-1.7 GB
    resident on 2 cores)."""
    return max(1, min(CORES, 4))


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """What lowbit keeps between runs (eval.base_cache, engine.aot's packages) goes to a temporary directory, not
    the user's cache."""
    names = ("LOWBIT_EVAL_CACHE_DIR", "LOWBIT_AOT_DIR")
    before = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def default_loaded():
    """The default model (SmolLM2-135M-Instruct, dequantized from its GGUF) in float32, loaded once."""
    return lowbit.load_model("default")


@pytest.fixture(scope="session")
def base(default_loaded):
    return default_loaded.model


@pytest.fixture(scope="session")
def tokenizer(default_loaded):
    return default_loaded.tokenizer


@pytest.fixture
def fresh(base):
    """A private copy of the base model to quantize in place."""
    return copy.deepcopy(base)


@pytest.fixture(scope="session")
def eval_ids(tokenizer):
    from lowbit.data import load_text, token_windows
    return token_windows(tokenizer, load_text(None, "evaluation"), ctx=256, max_windows=2)


@pytest.fixture(scope="session")
def first_last_inputs(base, tokenizer):
    """Calibration inputs (8 windows of 128 tokens) of the first and the last block of the unquantized model."""
    from lowbit.data import calibration_samples, load_text
    from lowbit.models.calibration import capture_block_inputs, run_block
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=8, seqlen=128, seed=0)
    first = last = capture_block_inputs(base, samples)
    for block in base.model.layers[:-1]:
        last = run_block(block, last)
    return {0: first, len(base.model.layers) - 1: last}


def truncated(model, n_blocks: int):
    """A copy of the model with only its first n blocks (fast end-to-end runs)."""
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n_blocks]
    m.config.num_hidden_layers = n_blocks
    return m


def quantized(model, bits=4, group_size=64, symmetric=True, kernel="auto", recipe_rules=None):
    scheme = lowbit.RTN(bits=bits, group_size=group_size, symmetric=symmetric, kernel=kernel)
    recipe = lowbit.Recipe.from_rules(recipe_rules, scheme) if recipe_rules else lowbit.Recipe.default(scheme)
    return lowbit.quantize(model, recipe, progress=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_loaded):
    """A tiny random llama-architecture Hugging Face directory with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(default_loaded.tokenizer), tie_word_embeddings=True,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(str(out))
    default_loaded.tokenizer.save_pretrained(str(out))
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
