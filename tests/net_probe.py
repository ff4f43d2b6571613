"""Test tool: what an anonymous client gets from a URL (the security tests' probe)."""

from __future__ import annotations

import urllib.error
import urllib.request


def anonymous_status(method: str, url: str, body: bytes | None = None) -> int | str:
    """HTTP status of an anonymous request, or "refused" when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method),
                                    timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError) as exc:
        if isinstance(exc, ConnectionError) or "refused" in str(exc).lower():
            return "refused"
        return str(exc)
