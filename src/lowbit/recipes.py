"""Which module gets which scheme: ordered rules from module-name patterns to a scheme, or to "keep".

A pattern is a shell-style glob over the module's full name (`*.mlp.*`, `lm_head`) or, prefixed with `re:`,
a regular expression that must match the whole name. The first matching rule wins. Modules that no rule
matches are kept in 16-bit.

Recipe files (TOML or JSON) hold a list of rules; fields a rule leaves out come from the command-line scheme:

    [[rule]]
    match = "*.self_attn.*"
    bits = 8
    group_size = -1

    [[rule]]
    match = "*.mlp.*"
    bits = 4
    group_size = 64
    symmetric = false

    [[rule]]
    match = "lm_head"
    keep = true
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .config import RTN, IntWeightConfig, QuantConfig, config_for
from .errors import LowbitError
from .formats import GGUFSpec, IntSpec

MAX_PATTERN = 1000   # characters; a recipe pattern is a module name or a short expression, never a program


def compile_pattern(pattern, where: str = "recipe"):
    """A rule's pattern as a compiled regular expression (globs translated); a clear error if it is not one."""
    if not isinstance(pattern, str) or not pattern:
        raise LowbitError(f"{where}: 'match' must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN:
        raise LowbitError(f"{where}: pattern longer than {MAX_PATTERN} characters")
    try:
        return re.compile(pattern[3:] if pattern.startswith("re:") else fnmatch.translate(pattern))
    except re.error as e:
        raise LowbitError(f"{where}: invalid regular expression {pattern[3:]!r}: {e}") from None


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: QuantConfig | None  # None: keep the module in 16-bit

    def __post_init__(self):
        object.__setattr__(self, "_regex", compile_pattern(self.pattern, f"rule {self.pattern!r}"))

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None

    def to_dict(self) -> dict:
        return {"match": self.pattern, **({"keep": True} if self.scheme is None else self.scheme.to_dict())}


# "kind" and "fmt" appear in recorded recipes (a format's own fields); a rule file needs only the others
_RULE_KEYS = {"match", "keep", "method", "bits", "group_size", "symmetric", "kernel", "options", "kind", "fmt",
              "gguf_type", "type", "scale_bits", "super_block"}
_INT_KEYS = ("bits", "group_size", "symmetric", "scale_bits", "super_block")   # an integer format's fields


def _rule_config(r: dict, base: QuantConfig, where: str) -> QuantConfig:
    """A rule's fields over the base configuration: format fields and options it leaves out come from base
    (options only when the rule keeps base's method)."""
    method = r.get("method", base.method)
    if not isinstance(method, str):
        raise LowbitError(f"{where}: 'method' must be a string, got {method!r}")
    options = r.get("options", {})
    if not isinstance(options, dict):
        raise LowbitError(f"{where}: 'options' must be a table of option = value, got {options!r}")
    base_int = base if isinstance(base, IntWeightConfig) else RTN()
    spec = None
    if "gguf_type" in r or r.get("kind") == "gguf":   # a GGUF block type (recorded recipes say kind + type)
        spec = GGUFSpec(r.get("gguf_type", r.get("type")))
    elif r.get("kind", "int") != "int":   # a recorded non-integer format: its method fixes it
        pass
    elif isinstance(base, IntWeightConfig) and base.gguf_type is not None and not any(k in r for k in _INT_KEYS):
        spec = base.spec
    elif any(k in r for k in _INT_KEYS) or isinstance(base, IntWeightConfig):
        if base_int.gguf_type is not None:   # integer fields over a GGUF base start from the plain defaults
            base_int = RTN()
        spec = IntSpec(r.get("bits", base_int.bits), r.get("group_size", base_int.group_size),
                       r.get("symmetric", base_int.symmetric), r.get("scale_bits", base_int.scale_bits),
                       r.get("super_block", base_int.super_block))
    kernel = r.get("kernel", base.kernel)
    merged = {**(base.options() if method == base.method else {}), **options}
    return config_for(method, spec, kernel, merged)


@dataclass
class Recipe:
    rules: list[Rule]

    @classmethod
    def default(cls, scheme: QuantConfig | None = None, blocks: str = "model.layers") -> "Recipe":
        """Keep the lm_head (and, as it is not a Linear, the embedding); quantize every Linear in the blocks."""
        return cls([Rule("lm_head", None), Rule(f"{blocks}.*", scheme or RTN())])

    @classmethod
    def from_rules(cls, rules: list[dict], base: QuantConfig | None = None, blocks: str = "model.layers",
                   where: str = "recipe") -> "Recipe":
        """Rules given as dicts, followed by the default rules for anything they leave unmatched."""
        base = base or RTN()
        out = []
        for i, r in enumerate(rules):
            at = f"{where}: rule {i + 1}"
            if not isinstance(r, dict) or "match" not in r:
                raise LowbitError(f"{at} needs a 'match' pattern")
            unknown = set(r) - _RULE_KEYS
            if unknown:
                raise LowbitError(f"{at} has unknown keys {sorted(unknown)}; valid: {sorted(_RULE_KEYS)}")
            compile_pattern(r["match"], at)
            try:
                out.append(Rule(r["match"], None if r.get("keep") else _rule_config(r, base, at)))
            except LowbitError as e:
                raise LowbitError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None
        return cls(out + cls.default(base, blocks).rules)

    @classmethod
    def from_file(cls, path: str | Path, base: QuantConfig | None = None, blocks: str = "model.layers") -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"recipe file not found: {path}")
        try:
            if path.suffix == ".toml":
                import tomllib
                data = tomllib.loads(path.read_text())
            else:
                data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise LowbitError(f"cannot parse recipe {path}: {e}") from None
        rules = data.get("rule", data.get("rules")) if isinstance(data, dict) else data
        if not isinstance(rules, list):
            raise LowbitError(f"recipe {path} has no list of rules ([[rule]] in TOML, \"rules\": [...] in JSON)")
        return cls.from_rules(rules, base, blocks, where=str(path))

    def scheme_for(self, name: str) -> QuantConfig | None:
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return None

    def plan(self, model: nn.Module, fallbacks: dict | None = None) -> dict[str, QuantConfig]:
        """Module name -> configuration, for every Linear (and token embedding: its table is stored like a
        Linear's weight, one row per token) the recipe quantizes; every shape is checked up front. The default
        rules match no embedding, so it stays in 16-bit unless a rule names it. A GGUF type whose block does
        not divide a module's rows becomes llama.cpp's fallback type (or the module stays 16-bit); each such
        change is added to `fallbacks` as name -> {"requested", "stored"}."""
        plan = {}
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                scheme = self.scheme_for(name)
                if isinstance(scheme, IntWeightConfig):
                    fitted = scheme.fit_shape(tuple(mod.weight.shape))
                    if fitted is not scheme and fallbacks is not None:
                        fallbacks[name] = {"requested": scheme.gguf_type,
                                           "stored": "F16" if fitted is None else fitted.gguf_type}
                    scheme = fitted
                if scheme is not None:
                    scheme.spec.check_shape(tuple(mod.weight.shape), name)
                    plan[name] = scheme
        if not plan:
            raise LowbitError("the recipe quantizes no Linear module of this model")
        return plan

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self.rules]

