"""Which Ray cluster a jobs command talks to, and the token it authenticates with.

Ray 2.60 protects the dashboard with a bearer token when the cluster runs in token mode. The
SDK attaches that token only when the *client* process has ``RAY_AUTH_MODE=token``, which a
laptop submitting to a cluster rarely sets, so even an exported ``RAY_AUTH_TOKEN`` is not sent.
:func:`resolve_auth_headers` finds the token the way Ray's own loader does and shoal always
sends it; a cluster without auth ignores the header.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class JobsError(RuntimeError):
    """A Jobs API call failed; the message is one line that says how to fix it.

    Args:
        message: What went wrong and what to do about it.
        exit_code: 2 for wrong usage (bad address, unknown id), 1 for a runtime failure.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_address() -> str:
    """The dashboard address from the environment, else :data:`DEFAULT_ADDRESS`.

    ``RAY_ADDRESS`` counts only when it is an ``http(s)://`` URL: it usually holds the GCS
    address (``host:6379``) for ``ray.init``, which the Jobs API does not speak.
    """
    api = os.environ.get("RAY_API_SERVER_ADDRESS", "").strip()
    if api:
        return api
    ray_address = os.environ.get("RAY_ADDRESS", "").strip()
    if ray_address.lower().startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    """``address`` as an ``http(s)://host[:port]`` URL, or a :class:`JobsError` saying why not."""
    url = address.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise JobsError(
            f"{address!r} is not a Ray dashboard URL; pass --address http://HOST:8265 "
            "(the dashboard port, not the GCS or ray:// client port)",
            exit_code=2,
        )
    return url


def _read_token_file(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise JobsError(f"cannot read the Ray auth token from {source}: {exc.strerror}") from exc
    if not token:
        raise JobsError(f"the Ray auth token file from {source} is empty")
    return token


def find_token(token: str | None = None) -> tuple[str | None, str]:
    """Return ``(token, where it came from)`` in the order Ray's C++ loader uses."""
    if token:
        return token.strip(), "the token argument"
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    env_token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_token:
        return env_token, "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if token_path:
        # Ray does not fall back to the default file when this is set, so a typo in the
        # path fails loudly here too instead of silently sending a stale default token.
        source = f"RAY_AUTH_TOKEN_PATH={token_path}"
        return _read_token_file(Path(token_path).expanduser(), source), source
    default_file = Path.home() / ".ray" / "auth_token"
    if default_file.is_file():
        return _read_token_file(default_file, "~/.ray/auth_token"), "~/.ray/auth_token"
    return None, "no token found"


def resolve_auth_headers(token: str | None = None) -> dict[str, str]:
    """HTTP headers that authenticate to a Ray dashboard running in token mode.

    The token comes from, in order: the ``token`` argument, ``RAY_AUTH_TOKEN``, the file
    named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (where ``ray
    get-auth-token --generate`` and a local ``ray.init()`` write it). Surrounding whitespace
    is stripped, as Ray does. ``RAY_AUTH_MODE=disabled`` turns the lookup off.

    Args:
        token: An explicit token that overrides every other source.

    Returns:
        ``{"authorization": "Bearer <token>"}``, or ``{}`` when there is no token.

    Raises:
        JobsError: If ``RAY_AUTH_TOKEN_PATH`` names a file that is missing or empty.
    """
    found, _ = find_token(token)
    return {"authorization": f"Bearer {found}"} if found else {}
