"""Login credentials and the guard against guessing them.

Credentials never come from the command line (``ps`` shows it to every user of the machine):
``MIXOFSHOW_AUTH=USER:PASS`` in the environment, or ``--auth-file FILE`` holding ``USER:PASS``
on its first line. :class:`LoginThrottle` is ASGI middleware on Gradio's ``/login`` route: after
each failed login from a client the next attempt from that client waits longer (0.25 s, 0.5 s,
... up to 8 s), and after ``max_failures`` failures within ``window`` seconds the client is
refused (HTTP 429) until the window has passed since its last failure. A success clears the
client's record. Time and sleeping are injectable, so tests drive them without a clock race.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["AUTH_ENV", "LoginThrottle", "load_auth", "parse_auth"]

AUTH_ENV = "MIXOFSHOW_AUTH"


def parse_auth(value: str, where: str) -> tuple[str, str]:
    user, sep, password = value.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: expected USER:PASS with both parts non-empty")
    return user, password


def load_auth(auth_file: str | None, environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The login from ``--auth-file`` or ``$MIXOFSHOW_AUTH`` (the file wins), or ``None``."""
    environ = os.environ if environ is None else environ
    if auth_file is not None:
        path = Path(auth_file)
        try:
            first = path.read_text(encoding="utf-8").splitlines()[:1]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth-file {path}: cannot be read ({type(err).__name__})") from None
        return parse_auth(first[0] if first else "", f"--auth-file {path}")
    if environ.get(AUTH_ENV):
        return parse_auth(environ[AUTH_ENV], AUTH_ENV)
    return None


class LoginThrottle:
    """Slow down and then lock out repeated failed logins, per client address."""

    def __init__(self, app, max_failures: int = 10, window: float = 900.0, base_delay: float = 0.25,
                 max_delay: float = 8.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.app, self.max_failures, self.window = app, max_failures, window
        self.base_delay, self.max_delay, self.clock, self.sleep = base_delay, max_delay, clock, sleep
        self.failures: dict[str, list[float]] = {}  # client -> times of recent failures

    def _recent(self, client: str) -> list[float]:
        now = self.clock()
        kept = [t for t in self.failures.get(client, []) if now - t < self.window]
        self.failures[client] = kept
        return kept

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        recent = self._recent(client)
        if len(recent) >= self.max_failures:
            wait = int(self.window - (self.clock() - recent[-1])) + 1
            body = json.dumps({"detail": f"Too many failed logins; try again in {wait} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(wait).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if recent:
            await self.sleep(min(self.max_delay, self.base_delay * 2 ** (len(recent) - 1)))
        status = {}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.failures.pop(client, None)
        elif status.get("code") is not None and 400 <= status["code"] < 500:
            self.failures.setdefault(client, []).append(self.clock())
