"""Recipes: which pattern and method prune which layer.

A :class:`Recipe` holds a default pattern and method, per-layer overrides keyed
by module-name glob, and a skip list. Layer names are the model's module names
(``model.layers.3.mlp.down_proj``). A glob matches a name when
``fnmatch`` matches the whole name, or — for a glob without a leading ``*`` —
when the name ends with ``.`` + the glob, so ``down_proj`` and
``mlp.down_proj`` both match every MLP down projection.

Overrides are applied in order and every matching one counts: a later rule
replaces what an earlier one set. A recipe file (YAML, or JSON)::

    pattern: 2:4
    method: sparsegpt
    options: {damp: 0.01}            # options of the default method
    skip: [lm_head, "*.k_proj"]
    overrides:
      - match: "*.mlp.down_proj"
        pattern: 4:8
        method: true-obs
        options: {ng: 32}
      - match: "model.layers.0.*"
        pattern: dense
    calibration: {source: data.jsonl, n_samples: 128, seq_len: 2048, seed: 0}

``overrides`` may also be a mapping ``{glob: {pattern: ..., method: ..., options: ...}}``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..patterns import PatternChoice, parse_pattern
from .errors import UsageError
from .method_registry import MethodChoice, parse_method

__all__ = ["Rule", "LayerPlan", "Recipe", "load_recipe_file", "name_matches", "parse_override"]

_RECIPE_KEYS = {"pattern", "method", "options", "method_options", "skip", "overrides", "calibration"}
_RULE_KEYS = {"match", "pattern", "method", "options"}


def name_matches(name: str, glob: str) -> bool:
    """Whether module ``name`` matches ``glob`` (whole-name fnmatch, or a dotted suffix)."""
    if fnmatch.fnmatchcase(name, glob):
        return True
    return not glob.startswith("*") and fnmatch.fnmatchcase(name, "*." + glob)


@dataclass(frozen=True)
class Rule:
    """A per-layer override: layers matching ``match`` get these settings (``None`` = unchanged)."""

    match: str
    pattern: Optional[str] = None
    method: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"match": self.match}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.method is not None:
            out["method"] = self.method
        if self.options:
            out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: its pattern and method (``skipped`` layers are left alone)."""

    pattern: PatternChoice
    method: MethodChoice
    skipped: bool = False


@dataclass
class Recipe:
    """Default pattern and method, per-layer overrides and a skip list.

    Construct with :meth:`Recipe.create`, which validates every name (a bad one
    raises :class:`~s3sparse.llm.errors.UsageError`).
    """

    pattern: PatternChoice
    method: MethodChoice
    overrides: List[Rule] = field(default_factory=list)
    skip: List[str] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        pattern: Union[str, PatternChoice] = "2:4",
        method: Union[str, MethodChoice] = "sparsegpt",
        method_options: Optional[Mapping[str, Any]] = None,
        overrides: Union[None, Sequence[Any], Mapping[str, Any]] = None,
        skip: Sequence[str] = ("lm_head",),
    ) -> "Recipe":
        """A validated recipe; ``overrides`` is a list of :class:`Rule` / dicts, or ``{glob: settings}``."""
        recipe = cls(parse_pattern(pattern), parse_method(method, method_options), _rules(overrides), list(skip or ()))
        # Resolve every rule once now so that bad names fail before any work.
        for rule in recipe.overrides:
            recipe._apply(recipe._default_plan(), rule)
        return recipe

    def _default_plan(self) -> LayerPlan:
        return LayerPlan(self.pattern, self.method)

    def _apply(self, plan: LayerPlan, rule: Rule) -> LayerPlan:
        pattern = parse_pattern(rule.pattern) if rule.pattern is not None else plan.pattern
        base = plan.method
        if rule.method is not None:
            named = parse_method(rule.method)
            # The same method keeps the options it had; another starts from its defaults.
            base = plan.method if named.name == plan.method.name else named
        method = parse_method(base, rule.options) if rule.options else base
        return LayerPlan(pattern, method)

    def plan_for(self, layer_name: str) -> LayerPlan:
        """The :class:`LayerPlan` of the layer called ``layer_name``."""
        if any(name_matches(layer_name, glob) for glob in self.skip):
            return LayerPlan(self.pattern, self.method, skipped=True)
        plan = self._default_plan()
        for rule in self.overrides:
            if name_matches(layer_name, rule.match):
                plan = self._apply(plan, rule)
        return plan

    def to_dict(self) -> Dict[str, Any]:
        """The recipe as plain data (for the JSON report)."""
        return {
            "pattern": self.pattern.name,
            "method": self.method.name,
            "options": dict(self.method.options),
            "overrides": [rule.to_dict() for rule in self.overrides],
            "skip": list(self.skip),
        }


def _rules(overrides: Union[None, Sequence[Any], Mapping[str, Any]]) -> List[Rule]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        items = []
        for glob, settings in overrides.items():
            if isinstance(settings, str):
                settings = {"pattern": settings}
            if not isinstance(settings, Mapping):
                raise UsageError(f"override {glob!r}: settings must be a mapping or a pattern name, got {settings!r}")
            items.append({"match": glob, **settings})
        overrides = items
    rules = []
    for item in overrides:
        if isinstance(item, Rule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping) or "match" not in item:
            raise UsageError(f"an override must be a mapping with a 'match' glob, got {item!r}")
        unknown = sorted(set(item) - _RULE_KEYS)
        if unknown:
            raise UsageError(f"override {item['match']!r}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(_RULE_KEYS))}")
        options = item.get("options") or {}
        if not isinstance(options, Mapping):
            raise UsageError(f"override {item['match']!r}: options must be a mapping, got {options!r}")
        rules.append(
            Rule(
                str(item["match"]),
                None if item.get("pattern") is None else str(item["pattern"]),
                None if item.get("method") is None else str(item["method"]),
                dict(options),
            )
        )
    return rules


def parse_override(text: str) -> Rule:
    """A command-line override ``GLOB=PATTERN[,method=NAME][,OPTION=VALUE...]`` as a :class:`Rule`.

    ``"*.down_proj=4:8"``, ``"*.mlp.*=2:4,method=true-obs,ng=32"``, ``"model.layers.0.*=dense"``;
    ``"*.o_proj=method=obd"`` changes only the method.
    """
    glob, sep, spec = text.partition("=")
    if not sep or not glob.strip() or not spec.strip():
        raise UsageError(f"--override {text!r}: expected GLOB=PATTERN[,method=NAME][,OPTION=VALUE...]")
    pattern = method = None
    options: Dict[str, Any] = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if i != 0:
                raise UsageError(f"--override {text!r}: only the first item may be a bare pattern, got {part!r}")
            pattern = part
        elif key.strip() == "method":
            method = value.strip()
        elif key.strip() == "pattern":
            pattern = value.strip()
        else:
            options[key.strip()] = parse_scalar(value.strip())
    return Rule(glob.strip(), pattern, method, options)


def parse_scalar(text: str) -> Any:
    """``"32"`` → 32, ``"1e-4"`` → 1e-4, ``"none"`` → None, anything else stays a string."""
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_recipe_file(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a recipe file: ``(recipe kwargs for Recipe.create, calibration settings)``.

    YAML needs PyYAML (``pip install pyyaml``); ``.json`` files are read without it.

    Raises:
        UsageError: a missing or unreadable file, or unknown keys.
    """
    if not os.path.isfile(path):
        raise UsageError(f"recipe file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"recipe file {path!r}: invalid JSON ({exc})")
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError(f"recipe file {path!r}: reading YAML needs PyYAML (pip install pyyaml), or use a .json recipe")
        try:
            data = yaml.load(text, Loader=_recipe_yaml_loader(yaml))
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe file {path!r}: invalid YAML ({str(exc).splitlines()[0]})")
    data = data or {}
    if not isinstance(data, Mapping):
        raise UsageError(f"recipe file {path!r}: the top level must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _RECIPE_KEYS)
    if unknown:
        raise UsageError(f"recipe file {path!r}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(_RECIPE_KEYS))}")
    kwargs: Dict[str, Any] = {}
    for key in ("pattern", "method", "overrides", "skip"):
        if key in data and data[key] is not None:
            kwargs[key] = data[key]
    options = data.get("options", data.get("method_options"))
    if options:
        if not isinstance(options, Mapping):
            raise UsageError(f"recipe file {path!r}: options must be a mapping, got {options!r}")
        kwargs["method_options"] = dict(options)
    if "pattern" in kwargs:
        kwargs["pattern"] = str(kwargs["pattern"])
    if isinstance(kwargs.get("skip"), str):
        kwargs["skip"] = [kwargs["skip"]]
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, Mapping):
        raise UsageError(f"recipe file {path!r}: calibration must be a mapping, got {calibration!r}")
    return kwargs, dict(calibration)


def _recipe_yaml_loader(yaml):
    """A SafeLoader that reads ``2:4`` as the string "2:4", not YAML 1.1's base-60 integer 124."""
    import re

    class RecipeLoader(yaml.SafeLoader):
        pass

    number_tags = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    RecipeLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in number_tags]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    RecipeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    RecipeLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return RecipeLoader
