"""Search-space distributions of a sweep: `loguniform(1e-5, 1e-2)`, `choice([4, 8, 16])`, `grid([...])`, ...

Parsed from the sweep YAML into `Distribution`s (validated, torch- and ray-free); `to_tune()` gives
the `ray.tune` object when the sweep runs.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(BaseModel):
    """One searched key: `loguniform(1e-5, 1e-2)`, `choice([4, 8, 16])`, `grid([...])`, ..."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    args: tuple

    def sample_points(self) -> list:
        """Values whose validity bounds every sample: the ends of a range, or every listed value."""
        if self.kind in ("uniform", "loguniform"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]  # the upper bound is exclusive, as in Tune
        return list(self.args[0])

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.sample_points())

    def to_tune(self):
        """The `ray.tune` search-space object for this distribution."""
        from ray import tune

        a = self.args
        return {
            "uniform": lambda: tune.uniform(a[0], a[1]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]),
            "randint": lambda: tune.randint(a[0], a[1]),
            "choice": lambda: tune.choice(list(a[0])),
            "grid": lambda: tune.grid_search(list(a[0])),
        }[self.kind]()

    def to_pbt_mutation(self):
        """What PBT resamples from; it perturbs the current value by its factors either way.

        A grid or choice of numbers sets where trials start; as a mutation it stands for the range
        between its smallest and largest value (log scale when all are positive), since PBT's factor
        perturbation on a list would only step to a neighbouring listed value.
        """
        from ray import tune

        if self.kind in ("grid", "choice"):
            low, high = min(self.args[0]), max(self.args[0])
            if low == high:
                return [low]
            return tune.loguniform(low, high) if low > 0 else tune.uniform(low, high)
        return self.to_tune()

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(repr(list(v)) if isinstance(v, tuple) else repr(v) for v in self.args)})"


_CALL = re.compile(r"^\s*(?P<name>[A-Za-z_]+)\s*\((?P<args>.*)\)\s*$", re.S)
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _numbers(value):
    """YAML 1.1 reads `1e-4` as a string; a distribution's arguments mean it as a number."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def parse_distribution(key: str, spec: Any) -> Distribution:
    """`'loguniform(1e-5, 1e-2)'` or `{loguniform: [1e-5, 1e-2]}` -> Distribution; ValueError names the fix."""
    import yaml

    where = f"space.{key}"
    usage = ("write uniform(low, high), loguniform(low, high), randint(low, high_exclusive), "
             "choice([a, b, ...]) or grid([a, b, ...])")
    if isinstance(spec, dict) and len(spec) == 1:
        name, args = next(iter(spec.items()))
        args = list(args) if isinstance(args, (list, tuple)) and name not in ("choice", "grid") else [args]
    elif isinstance(spec, str) and (m := _CALL.match(spec)):
        name = m["name"]
        try:
            args = yaml.safe_load(f"[{m['args']}]")
        except yaml.YAMLError:
            raise ValueError(f"{where}: cannot read the arguments of {spec!r}; {usage}") from None
    else:
        raise ValueError(f"{where}: {spec!r} is not a distribution; {usage}")
    args = _numbers(args)
    if name not in DISTRIBUTIONS:
        guess = difflib.get_close_matches(name, DISTRIBUTIONS, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        raise ValueError(f"{where}: unknown distribution {name!r}.{hint} Allowed: {', '.join(DISTRIBUTIONS)}")
    if name in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
            raise ValueError(f"{where}: {name} takes two numbers (low, high), got {args!r}")
        low, high = args
        if not low < high:
            raise ValueError(f"{where}: {name} needs low < high, got ({low}, {high})")
        if name == "loguniform" and low <= 0:
            raise ValueError(f"{where}: loguniform needs low > 0, got {low}; use uniform for ranges touching 0")
        if name == "randint" and not (isinstance(low, int) and isinstance(high, int)):
            raise ValueError(f"{where}: randint takes integers (low, high_exclusive), got ({low}, {high})")
        return Distribution(kind=name, args=(low, high))
    if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
        raise ValueError(f"{where}: {name} takes one non-empty list, e.g. {name}([4, 8, 16]); got {args!r}")
    return Distribution(kind=name, args=(tuple(args[0]),))
