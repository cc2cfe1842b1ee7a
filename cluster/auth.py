"""Finding the Ray auth token a client should send, the same way Ray itself looks for it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")

HOW_TO_GET_A_TOKEN = (
    "set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH (or --token-file) at the cluster's token file, "
    "or copy it to ~/.ray/auth_token; on the head node `ray get-auth-token` prints it"
)


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages; never the token itself


def find_token(token_file: str | Path | None = None) -> Token | None:
    """Return the auth token to send, or None.

    Order: an explicit file, then Ray's own order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
    """
    candidates: list[tuple[str, Path]] = []
    if token_file:
        candidates.append(("--token-file", Path(token_file).expanduser()))
    else:
        value = os.environ.get(TOKEN_ENV, "").strip()
        if value:
            return Token(value, TOKEN_ENV)
        if os.environ.get(TOKEN_PATH_ENV):
            candidates.append((TOKEN_PATH_ENV, Path(os.environ[TOKEN_PATH_ENV]).expanduser()))
        candidates.append(("~/.ray/auth_token", DEFAULT_TOKEN_PATH.expanduser()))
    for source, path in candidates:
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                return Token(value, f"{source} ({path})")
        elif source != "~/.ray/auth_token":
            raise FileNotFoundError(f"{source}: token file {str(path)!r} does not exist; {HOW_TO_GET_A_TOKEN}")
    return None


def auth_headers(token: Token | None) -> dict[str, str]:
    """HTTP headers that Ray's dashboard accepts for token auth (empty without a token)."""
    return {"Authorization": f"Bearer {token.value}"} if token else {}
