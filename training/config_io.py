"""Reading run YAMLs and reporting their problems, for every config kind: `--set` overrides, readable
pydantic errors (one line per problem naming the key, the value and the fix), credential redaction,
`pkg://` data paths. Torch-free, like training.config, which defines the typed classes and re-exports these.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each naming the key and the fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        header = f"{source}: {len(problems)} problem(s)"
        super().__init__(header + "\n" + "\n".join(f"  - {p}" for p in problems))


# user:password@ (or token@) in a URI's authority, and secret-looking query parameters.
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|key|sig|signature)=)[^&#\s]+",
                           re.IGNORECASE)


def redact_credentials(value: Any) -> Any:
    """Replace credentials inside URI strings (e.g. an MLflow tracking URI) with '***', recursively."""
    if isinstance(value, str):
        value = _URI_USERINFO.sub(lambda m: f"{m['scheme']}***@", value)
        return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", value)
    if isinstance(value, dict):
        return {k: redact_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_credentials(v) for v in value]
    return value


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model that `loc` (minus its last element) points into."""
    cls: Any = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, model_cls: type[BaseModel]) -> list[str]:
    """One readable line per pydantic error: the dotted key, the bad value, and what to do."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model_cls, loc)
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            problems.append(f"{key}: unknown key.{hint} Allowed keys here: {', '.join(allowed)}")
        elif kind == "missing":
            problems.append(f"{key}: required but missing; add it to the YAML")
        elif kind == "value_error":
            # Our own validators already name the key, the value and the fix.
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            # A section used inside another (e.g. prune's heal.optim) names its keys from itself: add the outer path.
            outer = ".".join(str(p) for p in loc[:-1])
            problems.extend(f"{outer}.{part.strip()}" if outer and part.strip().startswith(f"{loc[-1]}.")
                            else part.strip() for part in msg.split("; "))
        else:
            got = e.get("input")
            problems.append(f"{key}: {e['msg']} (got {got!r}); fix the value in the YAML or with --set {key}=...")
    return problems


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([f"--set {dotted}: '{part}' is a value, not a section"])
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b=value` overrides (values parsed as YAML) to a raw config dict."""
    problems = []
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
            continue
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"--set {key}: value {value!r} is not valid YAML ({exc.__class__.__name__})")
            continue
        _set_dotted(raw, key.strip(), parsed)
    if problems:
        raise ConfigError(problems, "--set")
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning syntax errors into a ConfigError with the line number."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"], str(p))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(p)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], str(p))
    return raw


_PKG_RE = re.compile(r"^pkg://(?P<pkg>[A-Za-z0-9_.]+)/(?P<rel>.+)$")


def resolve_data_path(spec: str) -> str:
    """Turn 'pkg://package/rel/path' into a filesystem path; other specs are returned expanded."""
    m = _PKG_RE.match(spec)
    if not m:
        return str(Path(spec).expanduser())
    import importlib.util

    found = importlib.util.find_spec(m["pkg"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec}: package '{m['pkg']}' is not installed; pip install it (e.g. pip install -e '.[test]')"
        )
    return str(Path(list(found.submodule_search_locations)[0]) / m["rel"])
