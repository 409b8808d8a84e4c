"""The grid of a recipe study: recipe flags given several values, their product, names.

Every :class:`~dinobench.config.Recipe` field is a ``sweep`` flag taking one or more
values. A flag with one value sets that field for every variant; the flags with several
values span the grid (their Cartesian product), and a variant is named after its values
for those flags only, in command-line order: ``teacher_temp=0.02,out_dim=256``.

Values are typed by the field's annotation. Tuple fields take their fixed arity per value,
either comma-joined (``--global-scale 0.4,1.0 0.25,1.0``: two values) or as plain numbers
grouped in order (``--global-scale 0.4 1.0 0.25 1.0``: the same two). Booleans take
``true``/``false``. In a name, tuple components are joined by ``_`` (``global_scale=
0.25_1.0``) since ``,`` separates the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import re
from dataclasses import dataclass, field

from . import config
from .config import AUTO_FIELDS, RECIPES, UNSET_FIELDS, defaults_text, recipe_fields
from .errors import ConfigError

# Recipe fields that set the length of a run rather than its recipe: presets added with
# --compare-recipes take these from the command line, so they train under the same budget.
BUDGET_FIELDS = ("epochs",)
BASE_NAME = "base"  # the one variant of a grid in which no flag varies
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_ORDER = "_grid_order"  # namespace attribute: recipe flags in command-line order


@dataclass(frozen=True)
class Variant:
    """One recipe of the study: a preset plus field overrides."""

    name: str
    recipe: str  # the preset it starts from (the profile is applied after it)
    overrides: dict = field(default_factory=dict)  # recipe fields set on top
    baseline: bool = False  # a preset added unchanged by --compare-recipes

    @property
    def slug(self) -> str:
        """The variant's folder name: its name, shortened with a hash when too long for
        a file name (the name itself holds only ``[a-z0-9_.,=+-]``)."""
        if len(self.name) <= 120:
            return self.name
        return f"{self.name[:100]}~{hashlib.sha1(self.name.encode()).hexdigest()[:10]}"

    def as_json(self) -> dict:
        return {"name": self.name, "recipe": self.recipe,
                "overrides": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in self.overrides.items()},
                "baseline": self.baseline}


def _kind(f: dataclasses.Field) -> tuple[str, int]:
    """(type, arity) of a recipe field from its annotation (a string, since config.py
    uses postponed annotations)."""
    t = str(f.type)
    if t.startswith("tuple"):
        return "tuple", t.count("float")
    return t.split(" |")[0], 1


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(f: dataclasses.Field, token: str, kind: str):
    try:
        return int(token) if kind == "int" else float(token)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"{flag(f.name)}: {token!r} is not {what}") from None


def parse_values(f: dataclasses.Field, tokens: list[str]) -> list:
    """The values typed after a recipe flag -> a list of field values (tuples for tuple
    fields). Raises :class:`ConfigError` naming the flag on a malformed or repeated
    value; range checks are left to :meth:`Recipe.validate`."""
    kind, arity = _kind(f)
    if not tokens:
        raise ConfigError(f"{flag(f.name)} needs at least one value")
    if kind == "tuple":
        if any("," in t for t in tokens):
            groups = [t.split(",") for t in tokens]
            bad = next((t for t, g in zip(tokens, groups) if len(g) != arity), None)
            if bad is not None:
                raise ConfigError(f"{flag(f.name)} takes {arity} comma-joined numbers per "
                                  f"value (e.g. {','.join(['0.5'] * arity)}), got {bad!r}")
        else:
            if len(tokens) % arity:
                raise ConfigError(f"{flag(f.name)} takes {arity} numbers per value, got "
                                  f"{len(tokens)}: {' '.join(tokens)}; join each value's "
                                  "numbers with commas, e.g. "
                                  f"{flag(f.name)} {','.join(['0.5'] * arity)}")
            groups = [tokens[i:i + arity] for i in range(0, len(tokens), arity)]
        values = [tuple(_number(f, x.strip(), "float") for x in g) for g in groups]
    elif kind == "bool":
        values = []
        for t in tokens:
            if t.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{flag(f.name)}: {t!r} is not true or false")
            values.append(t.lower() in _TRUE)
    elif kind in ("int", "float"):
        # 'auto' (None) where the field allows it: decided per dataset by the recipe;
        # 'unset' (None) where None means "not used", so one sweep can compare the two.
        values = [None if (t == "auto" and f.name in AUTO_FIELDS)
                  or (t == "unset" and f.name in UNSET_FIELDS) else _number(f, t, kind)
                  for t in tokens]
    else:  # str: a choice among names
        choices = _choices(f.name)
        bad = next((t for t in tokens if (t not in choices if choices else
                                          not re.fullmatch(r"[A-Za-z0-9_.-]+", t))), None)
        if bad is not None:
            raise ConfigError(f"{flag(f.name)}: {bad!r} is not one of {', '.join(choices)}"
                              if choices else f"{flag(f.name)}: {bad!r} is not a plain name")
        values = list(tokens)
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise ConfigError(f"{flag(f.name)} repeats the value {format_value(repeated)}; give "
                          "each value once")
    return values


def _choices(name: str) -> tuple[str, ...]:
    """The names a text field accepts (empty: any plain name; validate() judges it)."""
    return config.CHOICES.get(name, ())


def format_value(v) -> str:
    """A field value as it appears in a variant name (and so in a folder name)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "_".join(format_value(x) for x in v)
    return str(v)  # repr of a float: exact, so distinct values never share a name


def expand(recipe: str, values: dict[str, list], order: list[str] | None = None,
           compare: list[str] | tuple[str, ...] = ()) -> list[Variant]:
    """The variants of a study: the product of ``values`` (field -> its values) on top of
    preset ``recipe``, then each preset in ``compare`` unchanged except for the budget
    fields (:data:`BUDGET_FIELDS`, one variant per budget value).

    ``order`` (the flags in command-line order) orders the product and the names; fields
    missing from it follow in dataclass order. A preset identical to a grid variant is
    not added twice."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    order = list(dict.fromkeys([*(order or []), *values]))
    unknown = [k for k in order if k not in values]
    if unknown:
        raise ValueError(f"order names fields without values: {unknown}")
    for name, vs in values.items():
        if not vs:
            raise ConfigError(f"{flag(name)} needs at least one value")
    fixed = {k: values[k][0] for k in order if len(values[k]) == 1}
    varying = [k for k in order if len(values[k]) > 1]
    variants = []
    for combo in itertools.product(*(values[k] for k in varying)):
        chosen = dict(zip(varying, combo))
        name = ",".join(f"{k}={format_value(v)}" for k, v in chosen.items()) or BASE_NAME
        variants.append(Variant(name, recipe, {**fixed, **chosen}))
    budgets = [k for k in order if k in BUDGET_FIELDS]
    seen = {(v.recipe, _key(v.overrides)) for v in variants}
    for preset in dict.fromkeys(compare):
        if preset not in RECIPES:
            raise ConfigError(f"--compare-recipes: unknown recipe {preset!r}; choose from: "
                              f"{', '.join(RECIPES)}")
        for combo in itertools.product(*(values[k] for k in budgets)):
            overrides = dict(zip(budgets, combo))
            key = (preset, _key(overrides))
            if key in seen:
                continue
            seen.add(key)
            shown = [f"{k}={format_value(v)}" for k, v in overrides.items()
                     if len(values[k]) > 1]
            variants.append(Variant(",".join([f"preset={preset}", *shown]), preset,
                                    overrides, baseline=True))
    return variants


def _key(overrides: dict) -> tuple:
    return tuple(sorted(overrides.items()))


# --- command line ------------------------------------------------------------------
class _GridValues(argparse.Action):
    """Stores a recipe flag's raw values and remembers the order the flags were given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(values))
        order = list(getattr(namespace, _ORDER, None) or [])
        name = self.dest.split(".", 1)[1]
        if name not in order:
            order.append(name)
        setattr(namespace, _ORDER, order)


def add_grid_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per recipe field, each taking one or more values."""
    group = parser.add_argument_group(
        "recipe fields (the grid)",
        "every field of the recipe, each taking ONE OR MORE values: one value sets the "
        "field for every variant, several span the grid (the product over all such "
        "flags). Tuple fields take their arity per value, comma-joined for several "
        "values (--global-scale 0.4,1.0 0.25,1.0); booleans take true/false. Defaults "
        "shown as seed / official / small, then the quick profile's")
    for f in recipe_fields():
        kind, arity = _kind(f)
        shown = defaults_text(f, format_value)
        metavar = {"tuple": ",".join(["X"] * arity), "bool": "true|false",
                   "str": "|".join(_choices(f.name)) or "NAME"}.get(kind, kind.upper())
        group.add_argument(flag(f.name), dest=f"grid.{f.name}", nargs="+", default=None,
                           action=_GridValues, metavar=metavar,
                           help=f"{f.metadata['help']} (default: {shown})")


def grid_values(args: argparse.Namespace) -> tuple[dict[str, list], list[str]]:
    """Parsed values per recipe field given on the command line, and their order."""
    fields = {f.name: f for f in recipe_fields()}
    values = {k.split(".", 1)[1]: v for k, v in vars(args).items()
              if k.startswith("grid.") and v is not None}
    order = [k for k in getattr(args, _ORDER, None) or [] if k in values]
    return {k: parse_values(fields[k], values[k]) for k in order}, order
