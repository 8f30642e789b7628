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
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .algorithms import FIXED_SPECS, METHODS, check_options
from .errors import LowbitError
from .formats import IntSpec, spec_from_dict


@dataclass(frozen=True)
class Scheme:
    """How one Linear is quantized: the method that chooses values, the storage format, the kernel."""

    method: str = "rtn"
    spec: IntSpec = field(default_factory=IntSpec)
    kernel: str = "auto"
    options: dict = field(default_factory=dict)  # method settings, e.g. {"act_order": True, "damp": 0.01}

    def __post_init__(self):
        if self.method not in METHODS:
            raise LowbitError(f"unknown method '{self.method}'; available: {', '.join(METHODS)}")
        if self.method in FIXED_SPECS:  # these methods define their own weight format
            object.__setattr__(self, "spec", FIXED_SPECS[self.method])
        check_options(self.method, self.options)

    def to_dict(self) -> dict:
        return {"method": self.method, **self.spec.to_dict(), "kernel": self.kernel, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        return cls(method=d.get("method", "rtn"), spec=spec_from_dict(d), kernel=d.get("kernel", "auto"),
                   options=dict(d.get("options", {})))

    @property
    def name(self) -> str:
        return f"{self.method}-{self.spec.name}"


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: Scheme | None  # None: keep the module in 16-bit

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict:
        return {"match": self.pattern, **({"keep": True} if self.scheme is None else self.scheme.to_dict())}


_RULE_KEYS = {"match", "keep", "method", "bits", "group_size", "symmetric", "kernel", "options"}


@dataclass
class Recipe:
    rules: list[Rule]

    @classmethod
    def default(cls, scheme: Scheme | None = None, blocks: str = "model.layers") -> "Recipe":
        """Keep the lm_head (and, as it is not a Linear, the embedding); quantize every Linear in the blocks."""
        return cls([Rule("lm_head", None), Rule(f"{blocks}.*", scheme or Scheme())])

    @classmethod
    def from_rules(cls, rules: list[dict], base: Scheme | None = None, blocks: str = "model.layers",
                   where: str = "recipe") -> "Recipe":
        """Rules given as dicts, followed by the default rules for anything they leave unmatched."""
        base = base or Scheme()
        out = []
        for i, r in enumerate(rules):
            if not isinstance(r, dict) or "match" not in r:
                raise LowbitError(f"{where}: rule {i + 1} needs a 'match' pattern")
            unknown = set(r) - _RULE_KEYS
            if unknown:
                raise LowbitError(f"{where}: rule {i + 1} has unknown keys {sorted(unknown)}")
            if r.get("keep"):
                out.append(Rule(r["match"], None))
                continue
            spec = IntSpec(bits=int(r.get("bits", base.spec.bits)),
                           group_size=int(r.get("group_size", base.spec.group_size)),
                           symmetric=bool(r.get("symmetric", base.spec.symmetric)))
            method = r.get("method", base.method)
            options = {**(base.options if method == base.method else {}), **r.get("options", {})}
            out.append(Rule(r["match"], Scheme(method, spec, r.get("kernel", base.kernel), options)))
        return cls(out + cls.default(base, blocks).rules)

    @classmethod
    def from_file(cls, path: str | Path, base: Scheme | None = None, blocks: str = "model.layers") -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"recipe file not found: {path}")
        try:
            if path.suffix == ".toml":
                import tomllib
                data = tomllib.loads(path.read_text())
            else:
                data = json.loads(path.read_text())
        except Exception as e:
            raise LowbitError(f"cannot parse recipe {path}: {e}") from None
        rules = data.get("rule", data.get("rules")) if isinstance(data, dict) else data
        if not isinstance(rules, list):
            raise LowbitError(f"recipe {path} has no list of rules ([[rule]] in TOML, \"rules\": [...] in JSON)")
        return cls.from_rules(rules, base, blocks, where=str(path))

    def scheme_for(self, name: str) -> Scheme | None:
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return None

    def plan(self, model: nn.Module) -> dict[str, Scheme]:
        """Module name -> scheme, for every Linear the recipe quantizes; every shape is checked up front."""
        plan = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                scheme = self.scheme_for(name)
                if scheme is not None:
                    scheme.spec.check_shape((mod.out_features, mod.in_features), name)
                    plan[name] = scheme
        if not plan:
            raise LowbitError("the recipe quantizes no Linear module of this model")
        return plan

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self.rules]
