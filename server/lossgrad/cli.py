"""Command line: ``lossgrad serve`` runs the service, ``lossgrad losses`` prints the catalog,
``lossgrad compile`` fills numba's cache (run it once at install or image build),
``lossgrad plot`` draws losses and their gradients."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import affinity, catalog, plugin, shm
from .auth import read_token_file
from .server import (
    DEFAULT_GRACE_S,
    DEFAULT_MAX_CONNECTION_AGE_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_WORKERS,
    TlsConfig,
    serve,
)
from .service import DEFAULT_MAX_STREAM_CHUNKS
from .telemetry import JsonFormatter

_ENV_HOST = "LOSSGRAD_HOST"
_ENV_PORT = "LOSSGRAD_PORT"
_ENV_MAX_WORKERS = "LOSSGRAD_MAX_WORKERS"
_ENV_MAX_MESSAGE_BYTES = "LOSSGRAD_MAX_MESSAGE_BYTES"
_ENV_MAX_ELEMENTS = "LOSSGRAD_MAX_ELEMENTS"
_ENV_MAX_STREAM_ELEMENTS = "LOSSGRAD_MAX_STREAM_ELEMENTS"
_ENV_MAX_STREAM_CHUNKS = "LOSSGRAD_MAX_STREAM_CHUNKS"
_ENV_MAX_CONCURRENT_RPCS = "LOSSGRAD_MAX_CONCURRENT_RPCS"
_ENV_MAX_CONNECTION_AGE = "LOSSGRAD_MAX_CONNECTION_AGE_SECONDS"
_ENV_GRACE = "LOSSGRAD_GRACE_SECONDS"
_ENV_HEALTH_PORT = "LOSSGRAD_HEALTH_PORT"
_ENV_REFLECTION = "LOSSGRAD_REFLECTION"
_ENV_KSERVE = "LOSSGRAD_KSERVE"
_ENV_TLS_CERT = "LOSSGRAD_TLS_CERT"
_ENV_TLS_KEY = "LOSSGRAD_TLS_KEY"
_ENV_TLS_CLIENT_CA = "LOSSGRAD_TLS_CLIENT_CA"
_ENV_AUTH_TOKEN_FILE = "LOSSGRAD_AUTH_TOKEN_FILE"
_ENV_METRICS_PORT = "LOSSGRAD_METRICS_PORT"
_ENV_LOG_FORMAT = "LOSSGRAD_LOG_FORMAT"
_ENV_ACCESS_LOG = "LOSSGRAD_ACCESS_LOG"
_ENV_IO_CPU = "LOSSGRAD_IO_CPU"
# --access-log choice -> level of the lossgrad.access logger (failed calls log at WARNING)
_ACCESS_LOG_LEVELS = {"all": logging.INFO, "errors": logging.WARNING, "off": logging.CRITICAL}
_ENV_SHM = "LOSSGRAD_SHARED_MEMORY"
_ENV_SHM_DIR = "LOSSGRAD_SHARED_MEMORY_DIR"
_ENV_SHM_PREFIX = "LOSSGRAD_SHARED_MEMORY_KEY_PREFIX"
_ENV_SHM_MAX_REGIONS = "LOSSGRAD_SHARED_MEMORY_MAX_REGIONS"
_ENV_SHM_MAX_BYTES = "LOSSGRAD_SHARED_MEMORY_MAX_BYTES"
_ENV_SHM_SOCKET = "LOSSGRAD_SHARED_MEMORY_SOCKET"
_ENV_PLUGINS = plugin.ENV_PLUGINS
_ENV_PLUGIN_ERRORS = plugin.ENV_PLUGIN_ERRORS
_TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossgrad`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.reflection is None:
            args.reflection = _env_bool(parser, _ENV_REFLECTION, True)
        if args.kserve is None:
            args.kserve = _env_bool(parser, _ENV_KSERVE, True)
        if args.shared_memory is None:
            args.shared_memory = _env_bool(parser, _ENV_SHM, False)
        if args.plugins is None:
            args.plugins = _env_bool(parser, _ENV_PLUGINS, True)
        return _serve(args)
    if args.command == "plot":
        return _plot(args)
    try:
        plugin.load()  # the catalog and the kernels include the installed plugin losses
    except plugin.PluginError as err:
        print(f"lossgrad: {err}", file=sys.stderr)
        return 1
    if args.command == "losses":
        sys.stdout.write(format_catalog(catalog.all_losses()))
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
    serve.add_argument("--max-elements", type=_non_negative_int,
                       default=env(_ENV_MAX_ELEMENTS, "0"),
                       help="most tensor elements one request may declare, 0 for no limit "
                            f"(env {_ENV_MAX_ELEMENTS}; default %(default)s)")
    serve.add_argument("--max-stream-elements", type=_non_negative_int,
                       default=env(_ENV_MAX_STREAM_ELEMENTS, "0"),
                       help="most tensor elements one ComputeStream call may declare in its "
                            "header, 0 for no limit (env "
                            f"{_ENV_MAX_STREAM_ELEMENTS}; default %(default)s)")
    serve.add_argument("--max-stream-chunks", type=_positive_int,
                       default=env(_ENV_MAX_STREAM_CHUNKS, str(DEFAULT_MAX_STREAM_CHUNKS)),
                       help="most chunk messages in one ComputeStream call, weight pass "
                            f"included (env {_ENV_MAX_STREAM_CHUNKS}; default %(default)s)")
    serve.add_argument("--max-concurrent-rpcs", type=_non_negative_int,
                       default=env(_ENV_MAX_CONCURRENT_RPCS, "0"),
                       help="most calls in progress or queued; more get RESOURCE_EXHAUSTED "
                            "(health checks count but are never refused); 0 for no limit "
                            f"(env {_ENV_MAX_CONCURRENT_RPCS}; default %(default)s)")
    serve.add_argument("--max-connection-age-seconds", type=_non_negative_float,
                       default=env(_ENV_MAX_CONNECTION_AGE, f"{DEFAULT_MAX_CONNECTION_AGE_S:g}"),
                       help="close connections after this long, so that clients re-resolve "
                            f"the name; 0 for never (env {_ENV_MAX_CONNECTION_AGE}; "
                            "default %(default)s)")
    serve.add_argument("--grace", type=_non_negative_float,
                       default=env(_ENV_GRACE, f"{DEFAULT_GRACE_S:g}"),
                       help="seconds that calls in flight get to finish on SIGTERM/SIGINT "
                            f"(env {_ENV_GRACE}; default %(default)s)")
    serve.add_argument("--health-port", type=_port, default=env(_ENV_HEALTH_PORT, "0"),
                       help="also serve grpc.health.v1 alone, in plaintext, on this port (for "
                            f"probes that cannot do TLS); 0 for off (env {_ENV_HEALTH_PORT}; "
                            "default %(default)s)")
    serve.add_argument("--reflection", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="serve gRPC reflection, for grpcurl and other tools "
                            f"(env {_ENV_REFLECTION}=0/1; default on)")
    serve.add_argument("--kserve", action=argparse.BooleanOptionalAction, default=None,
                       help="also serve the Open Inference Protocol (KServe v2) gRPC API, "
                            "inference.GRPCInferenceService, for tritonclient and "
                            f"perf_analyzer (env {_ENV_KSERVE}=0/1; default on)")
    serve.add_argument("--tls-cert", default=env(_ENV_TLS_CERT),
                       help="PEM certificate chain: serve TLS instead of plaintext "
                            f"(env {_ENV_TLS_CERT}; needs --tls-key)")
    serve.add_argument("--tls-key", default=env(_ENV_TLS_KEY),
                       help=f"PEM private key of --tls-cert (env {_ENV_TLS_KEY})")
    serve.add_argument("--tls-client-ca", default=env(_ENV_TLS_CLIENT_CA),
                       help="PEM CA certificates: require client certificates signed by them "
                            f"(mutual TLS; env {_ENV_TLS_CLIENT_CA})")
    serve.add_argument("--auth-token-file", default=env(_ENV_AUTH_TOKEN_FILE),
                       help="file holding a bearer token that calls must send as "
                            "'authorization: Bearer TOKEN' (health and reflection need none; "
                            f"env {_ENV_AUTH_TOKEN_FILE})")
    serve.add_argument("--metrics-port", type=_port, default=env(_ENV_METRICS_PORT, "0"),
                       help="serve Prometheus metrics over HTTP at /metrics on this port; 0 "
                            f"for off (env {_ENV_METRICS_PORT}; default %(default)s)")
    serve.add_argument("--log-format", choices=("text", "json"), type=_one_of("text", "json"),
                       default=env(_ENV_LOG_FORMAT, "text"),
                       help="log lines, one per call and per event, as text or JSON objects "
                            f"(env {_ENV_LOG_FORMAT}; default %(default)s)")
    serve.add_argument("--access-log", choices=tuple(_ACCESS_LOG_LEVELS),
                       type=_one_of(*_ACCESS_LOG_LEVELS),
                       default=env(_ENV_ACCESS_LOG, "errors"),
                       help="which calls get an access log line: every call, failed calls "
                            f"only, or none (env {_ENV_ACCESS_LOG}; default %(default)s)")
    serve.add_argument("--io-cpu", type=_io_cpu, default=env(_ENV_IO_CPU, affinity.OFF),
                       help="pin the threads that carry calls (gRPC's and the server's "
                            "Python threads; numba's kernel threads stay on every CPU) to "
                            "this CPU: small calls return sooner on a host whose idle CPUs "
                            f"sleep; '{affinity.AUTO}' for the highest CPU this process may "
                            f"use, '{affinity.OFF}' for none (env {_ENV_IO_CPU}; default "
                            "%(default)s)")
    _shared_memory_options(serve)
    serve.add_argument("--plugins", action=argparse.BooleanOptionalAction, default=None,
                       help="load the plugin losses of installed packages (entry point group "
                            f"{plugin.GROUP}; env {_ENV_PLUGINS}=0/1; default on)")
    serve.add_argument("--plugin-errors", choices=("fail", "skip"),
                       type=_one_of("fail", "skip"), default=env(_ENV_PLUGIN_ERRORS, "fail"),
                       help="a plugin that fails to load stops the start (fail), or is left "
                            "out, logged and listed in GetServerInfo (skip) "
                            f"(env {_ENV_PLUGIN_ERRORS}; default %(default)s)")
    commands.add_parser("losses", help="print the loss catalog")
    commands.add_parser(
        "compile", help="compile every kernel into numba's cache and warm it",
        description="Compile every kernel into numba's cache (NUMBA_CACHE_DIR moves it), so "
                    "that servers started later are ready in about a second.")
    plot = commands.add_parser(
        "plot", help="draw losses and their gradients into an image file",
        description="Draw each LOSS and its gradient as functions of the prediction, for a "
                    "few targets, from what a server computes (needs matplotlib: the 'plot' "
                    "extra). Without --target a server is started on a loopback port for "
                    "the duration.")
    plot.add_argument("losses", nargs="+", metavar="LOSS",
                      help="loss name or alias, optionally with its own parameters: "
                           "huber:delta=0.5 (NAME:K=V,K=V)")
    plot.add_argument("--param", action="append", default=[], metavar="K=V",
                      help="parameter for every LOSS that has it (repeatable)")
    plot.add_argument("--target", metavar="ADDRESS",
                      help="host:port of a running server (default: start one)")
    plot.add_argument("--targets", type=_floats, metavar="T,T",
                      help="target values: values for regression, 1/0 for positive/negative "
                           "labels, 0/1 for the true/wrong class (default: a few per kind)")
    plot.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="image file to write; the format follows the extension (.png)")
    return parser


def _shared_memory_options(serve: argparse.ArgumentParser) -> None:
    env = os.environ.get
    serve.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=None,
                       help="accept tensors and write outputs in registered POSIX shared "
                            "memory (a client on the same host, e.g. a sidecar's worker) "
                            f"(env {_ENV_SHM}=0/1; default off)")
    serve.add_argument("--shared-memory-dir", default=env(_ENV_SHM_DIR, shm.DEFAULT_DIRECTORY),
                       help="directory whose files are the shared-memory keys (env "
                            f"{_ENV_SHM_DIR}; default %(default)s)")
    serve.add_argument("--shared-memory-key-prefix",
                       default=env(_ENV_SHM_PREFIX, shm.DEFAULT_KEY_PREFIX),
                       help="only keys starting with this may be opened (env "
                            f"{_ENV_SHM_PREFIX}; default %(default)s)")
    serve.add_argument("--shared-memory-max-regions", type=_positive_int,
                       default=env(_ENV_SHM_MAX_REGIONS, str(shm.DEFAULT_MAX_REGIONS)),
                       help="most regions registered at once (env "
                            f"{_ENV_SHM_MAX_REGIONS}; default %(default)s)")
    serve.add_argument("--shared-memory-max-bytes", type=_positive_int,
                       default=env(_ENV_SHM_MAX_BYTES, str(shm.DEFAULT_MAX_BYTES)),
                       help="most bytes of regions registered at once (env "
                            f"{_ENV_SHM_MAX_BYTES}; default %(default)s)")
    serve.add_argument("--shared-memory-socket", type=_socket_name,
                       default=env(_ENV_SHM_SOCKET, shm.DEFAULT_SOCKET),
                       help="file name, in the shared-memory directory, of the Unix socket "
                            "that carries calls whose tensors are in shared memory ({port} "
                            "is the server's port; '' for none) (env "
                            f"{_ENV_SHM_SOCKET}; default %(default)s)")


def _socket_name(value: str) -> str:
    try:
        shm.SharedMemoryConfig(socket=value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _shared_memory(args: argparse.Namespace) -> shm.SharedMemoryConfig | None:
    if not args.shared_memory:
        return None
    return shm.SharedMemoryConfig(args.shared_memory_dir, args.shared_memory_key_prefix,
                                  args.shared_memory_max_regions, args.shared_memory_max_bytes,
                                  args.shared_memory_socket)


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def _plot(args: argparse.Namespace) -> int:
    from lossgrad_client import LossgradError

    from .plot import PlotError, plot

    def start_server() -> tuple[Any, str]:
        from .server import create_server

        server, port = create_server("127.0.0.1", 0, warm=False, max_workers=2)
        return server, f"127.0.0.1:{port}"

    try:
        plot(args.target, args.losses, args.param, args.output, args.targets,
             start_server=start_server)
    except PlotError as err:
        print(f"lossgrad plot: {err}", file=sys.stderr)
        return 2
    except (LossgradError, plugin.PluginError, OSError) as err:
        print(f"lossgrad plot: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


def _compile() -> int:
    import numba

    from . import engine  # warmup compiles (or loads) every kernel

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


def _one_of(*names: str) -> Callable[[str], str]:
    """A converter that accepts only ``names``: argparse checks ``choices`` on the command
    line but not on a default, which here may come from an environment variable."""
    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(names)}, got {text!r}")
        return text
    return convert


def _io_cpu(text: str) -> int | None:
    try:
        return affinity.parse_cpu(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _port(text: str) -> int:
    return _int(text, 0, 65535)


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _non_negative_int(text: str) -> int:
    return _int(text, 0)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _env_bool(parser: argparse.ArgumentParser, name: str, default: bool) -> bool:
    text = os.environ.get(name)
    if text is None:
        return default
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    parser.error(f"{name} must be 0 or 1, got {text!r}")


def _serve(args: argparse.Namespace) -> int:
    try:
        tls = _tls(args)
        token = read_token_file(args.auth_token_file) if args.auth_token_file else None
        shared_memory = _shared_memory(args)
    except (OSError, ValueError) as err:
        print(f"lossgrad: {err}", file=sys.stderr)
        return 1
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json"
                         else logging.Formatter(_TEXT_LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("lossgrad.access").setLevel(_ACCESS_LOG_LEVELS[args.access_log])

    def ready(host: str, port: int) -> None:
        print(f"lossgrad serving on {host}:{port}", flush=True)

    try:
        serve(args.host, args.port, max_workers=args.max_workers,
              max_message_bytes=args.max_message_bytes,
              max_elements=args.max_elements or None,
              max_stream_elements=args.max_stream_elements or None,
              max_stream_chunks=args.max_stream_chunks,
              max_concurrent_rpcs=args.max_concurrent_rpcs or None,
              max_connection_age_s=args.max_connection_age_seconds or None,
              health_port=args.health_port or None, reflection=args.reflection,
              metrics_port=args.metrics_port or None, kserve_api=args.kserve,
              tls=tls, auth_token=token, grace=args.grace, on_ready=ready,
              shared_memory=shared_memory, plugins=args.plugins,
              plugin_errors=args.plugin_errors, io_cpu=args.io_cpu)
    except (OSError, plugin.PluginError) as err:
        print(f"lossgrad: {err}", file=sys.stderr)
        return 1
    return 0


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        return TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    return None


def format_catalog(losses: Sequence[catalog.LossSpec]) -> str:
    """Render the catalog as a text table: one row per loss, one line per parameter."""
    header = ("NAME", "ALIASES", "PREDICTIONS", "TARGETS", "HESSIAN", "PARAMS")
    rows: list[tuple[str, ...]] = []
    for spec in losses:
        params = [_format_param(p) for p in spec.params] or ["-"]
        hessian = "/".join(m.value for m in spec.hessian_modes) or "-"
        rows.append((spec.name, ", ".join(spec.aliases) or "-", _format_input(spec.predictions),
                     _format_input(spec.targets), hessian, params[0]))
        rows.extend(("", "", "", "", "", extra) for extra in params[1:])
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1]
        for row in (header, *rows)
    ]
    lines += [f"{spec.name}: plugin {spec.plugin.entry_point} ({spec.plugin.distribution} "
              f"{spec.plugin.version})" for spec in losses if spec.plugin is not None]
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
