"""``mixofshow app [--host 127.0.0.1] [--port 7860] [--runs-dir DIR] [--auth-file FILE] [--ssl-certfile F --ssl-keyfile F]``.

Binds the loopback address by default. Any other address serves the whole runs folder and the
job queue to the network, so it is refused without a login: ``MIXOFSHOW_AUTH=USER:PASS`` or
``--auth-file FILE`` (never a password on the command line, where ``ps`` shows it). Failed
logins slow down and lock out per client (``app/login.py``); ``--ssl-certfile`` and
``--ssl-keyfile`` serve HTTPS.
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from app.login import AUTH_ENV, load_auth

__all__ = ["add_parser", "check_bind", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="the web app: train, fuse, sample and browse runs in a browser",
        description="Serve the Gradio web app (train, fuse, sample, browse runs; jobs run in a worker "
        f"process) on --host:--port; binding beyond loopback needs a login (${AUTH_ENV}=USER:PASS or --auth-file).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs-dir", default="runs", help="where jobs, runs and uploads live (default runs)")
    p.add_argument("--auth", metavar="USER:PASS", help=argparse.SUPPRESS)  # refused: argv is public
    p.add_argument("--auth-file", metavar="FILE",
                   help=f"require the login USER:PASS on this file's first line (or set ${AUTH_ENV}); "
                        "needed for a non-loopback --host")
    p.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate (with --ssl-keyfile)")
    p.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's private key")
    p.add_argument("--models-dir", metavar="DIR", help="base models the Train tab offers: diffusers folders and "
                   ".safetensors files in DIR (a base model given as a path must lie here or in the runs folder)")
    p.add_argument("--device", help="device the worker runs jobs on (default: cuda when available, else cpu)")
    p.set_defaults(func=run)


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
            f"set {AUTH_ENV}=USER:PASS or --auth-file FILE, or use --host 127.0.0.1 (the default)"
        )


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    if (certfile is None) != (keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both or neither")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")


def run(args: argparse.Namespace) -> int:
    if args.auth is not None:
        raise ValueError(f"--auth: a password on the command line is visible to every user (ps); "
                         f"set {AUTH_ENV}=USER:PASS or write it to a file for --auth-file")
    auth = load_auth(args.auth_file)
    check_bind(args.host, auth)
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    from mixofshow.utils.paths import check_output_dir

    check_output_dir(args.runs_dir, "--runs-dir")  # a file, or a read-only place: exit 2 before gradio loads
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: expected 1..65535")
    from app.server import serve  # gradio is imported here, not at `mixofshow --help`

    if args.models_dir is not None and not os.path.isdir(args.models_dir):
        raise ValueError(f"--models-dir {args.models_dir}: no such folder")
    serve(args.runs_dir, host=args.host, port=args.port, auth=auth, device=args.device,
          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, models_dir=args.models_dir)
    return 0
