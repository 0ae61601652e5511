"""``mixofshow app [--host 127.0.0.1] [--port 7860] [--runs-dir DIR] [--auth user:pass]``.

Binds the loopback address by default. Any other address serves the whole runs folder and the
job queue to the network, so it is refused unless ``--auth`` sets a login.
"""

from __future__ import annotations

import argparse
import ipaddress

__all__ = ["add_parser", "check_bind", "parse_auth", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="the web app: train, fuse, sample and browse runs in a browser",
        description="Serve the Gradio web app (train, fuse, sample, browse runs; jobs run in a worker "
        "process) on --host:--port; binding beyond loopback needs --auth.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs-dir", default="runs", help="where jobs, runs and uploads live (default runs)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login (needed for a non-loopback --host)")
    p.add_argument("--device", help="device the worker runs jobs on (default: cuda when available, else cpu)")
    p.set_defaults(func=run)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {value!r}: expected USER:PASS with both parts non-empty")
    return user, password


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse a non-loopback address without a login (``ValueError``: the CLI exits 2)."""
    if not _is_loopback(host) and auth is None:
        raise ValueError(
            f"--host {host}: refusing to serve the app beyond this machine without a login; "
            "add --auth USER:PASS, or use --host 127.0.0.1 (the default)"
        )


def run(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth)
    check_bind(args.host, auth)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: expected 1..65535")
    from app.server import serve  # gradio is imported here, not at `mixofshow --help`

    serve(args.runs_dir, host=args.host, port=args.port, auth=auth, device=args.device)
    return 0
