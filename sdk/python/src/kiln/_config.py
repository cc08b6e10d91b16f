"""Where the daemon is and which key to use: arguments, then ``KILN_URL`` and
``KILN_API_KEY``, then the CLI's config file (``kiln keys create --save`` writes it)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older interpreters only
    import tomli as tomllib

from .exceptions import AuthenticationError, InvalidRequestError

DEFAULT_URL = "http://127.0.0.1:7070"
DEFAULT_REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach the daemon."""

    url: str
    api_key: str
    request_timeout: float


def cli_config_path() -> Optional[Path]:
    """``$XDG_CONFIG_HOME/kiln/cli.toml`` or ``~/.config/kiln/cli.toml``, as the CLI reads."""
    base = os.environ.get("XDG_CONFIG_HOME")
    if base:
        return Path(base) / "kiln" / "cli.toml"
    home = os.environ.get("HOME")
    return Path(home) / ".config" / "kiln" / "cli.toml" if home else None


def _read_cli_config() -> dict[str, Any]:
    path = cli_config_path()
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequestError(f"reading the CLI config {path}: {e}") from e


def resolve(
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    request_timeout: Optional[float] = None,
    *,
    require_key: bool = True,
) -> ConnectionConfig:
    """The connection settings from arguments, the environment and the CLI config."""
    file: dict[str, Any] = {}
    if (
        url is None
        and "KILN_URL" not in os.environ
        or (api_key is None and "KILN_API_KEY" not in os.environ)
    ):
        file = _read_cli_config()
    url = url or os.environ.get("KILN_URL") or file.get("url") or DEFAULT_URL
    api_key = api_key or os.environ.get("KILN_API_KEY") or file.get("api_key")
    if not api_key and require_key:
        raise AuthenticationError(
            "no API key: pass api_key=, set KILN_API_KEY, or save one with "
            "`kiln keys create --tenant NAME --save`"
        )
    return ConnectionConfig(
        url=str(url).rstrip("/"),
        api_key=str(api_key or ""),
        request_timeout=(DEFAULT_REQUEST_TIMEOUT if request_timeout is None else request_timeout),
    )
