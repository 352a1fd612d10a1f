"""Command line: ``lossgrad serve`` runs the service, ``lossgrad losses`` prints the catalog,
``lossgrad compile`` fills numba's cache (run it once at install or image build)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import catalog
from .server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_WORKERS, serve

_ENV_HOST = "LOSSGRAD_HOST"
_ENV_PORT = "LOSSGRAD_PORT"
_ENV_MAX_WORKERS = "LOSSGRAD_MAX_WORKERS"
_ENV_MAX_MESSAGE_BYTES = "LOSSGRAD_MAX_MESSAGE_BYTES"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossgrad`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "losses":
        sys.stdout.write(format_catalog(catalog.LOSSES))
        return 0
    if args.command == "compile":
        return _compile()
    raise AssertionError(args.command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lossgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the gRPC service until SIGTERM/SIGINT",
        description="Run the gRPC service. Every option defaults to its environment "
                    "variable when that is set.",
    )
    env = os.environ.get
    serve.add_argument("--host", default=env(_ENV_HOST, "127.0.0.1"),
                       help=f"address to bind (env {_ENV_HOST}; default %(default)s)")
    serve.add_argument("--port", type=_port, default=env(_ENV_PORT, "50051"),
                       help=f"port to bind, 0 for any free port (env {_ENV_PORT}; "
                            "default %(default)s)")
    serve.add_argument("--max-workers", type=_positive_int,
                       default=env(_ENV_MAX_WORKERS, str(DEFAULT_MAX_WORKERS)),
                       help=f"worker threads (env {_ENV_MAX_WORKERS}; default %(default)s)")
    serve.add_argument("--max-message-bytes", type=_positive_int,
                       default=env(_ENV_MAX_MESSAGE_BYTES, str(DEFAULT_MAX_MESSAGE_BYTES)),
                       help=f"largest request or response (env {_ENV_MAX_MESSAGE_BYTES}; "
                            "default %(default)s)")
    commands.add_parser("losses", help="print the loss catalog")
    commands.add_parser(
        "compile", help="compile every kernel into numba's cache and warm it",
        description="Compile every kernel into numba's cache (NUMBA_CACHE_DIR moves it), so "
                    "that servers started later are ready in about a second.")
    return parser


def _compile() -> int:
    import numba

    from . import engine  # importing compiles (or loads) every kernel

    engine.warmup()
    print(f"lossgrad kernels are compiled and cached in {numba.config.CACHE_DIR}")
    return 0


def _int(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
    return value


def _port(text: str) -> int:
    return _int(text, 0, 65535)


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(host: str, port: int) -> None:
        print(f"lossgrad serving on {host}:{port}", flush=True)

    try:
        serve(args.host, args.port, max_workers=args.max_workers,
              max_message_bytes=args.max_message_bytes, on_ready=ready)
    except OSError as err:
        print(f"lossgrad: {err}", file=sys.stderr)
        return 1
    return 0


def format_catalog(losses: Sequence[catalog.LossSpec]) -> str:
    """Render the catalog as a text table: one row per loss, one line per parameter."""
    header = ("NAME", "ALIASES", "PREDICTIONS", "TARGETS", "PARAMS")
    rows: list[tuple[str, ...]] = []
    for spec in losses:
        params = [_format_param(p) for p in spec.params] or ["-"]
        rows.append((spec.name, ", ".join(spec.aliases) or "-", _format_input(spec.predictions),
                     _format_input(spec.targets), params[0]))
        rows.extend(("", "", "", "", extra) for extra in params[1:])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1]
        for row in (header, *rows)
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _format_input(spec: catalog.InputSpec) -> str:
    return f"{spec.kind.value} ({'/'.join(spec.dtypes)})"


def _format_param(spec: catalog.ParamSpec) -> str:
    default = "unset" if spec.default is None else str(spec.default).lower()
    text = f"{spec.name}={default}"
    if spec.minimum is not None or spec.maximum is not None:
        low = "-inf" if spec.minimum is None else f"{spec.minimum:g}"
        high = "inf" if spec.maximum is None else f"{spec.maximum:g}"
        left = "[" if spec.minimum is not None and spec.minimum_inclusive else "("
        right = "]" if spec.maximum is not None and spec.maximum_inclusive else ")"
        each = " each" if spec.type is catalog.ParamType.DOUBLE_LIST else ""
        text += f"{each} in {left}{low}, {high}{right}"
    return text


if __name__ == "__main__":
    sys.exit(main())
