"""A bare gRPC echo server: ``/bench.Echo/Echo`` returns the request bytes unchanged.

No protobuf on either side (identity serializers), the same message-size limit and
worker-pool size as the lossgrad server it is compared with: the floor of one unary call
through grpcio's Python server carrying the same number of bytes.

    python bench/echo_server.py --port 0 --max-workers 4
prints ``echo serving on 127.0.0.1:PORT`` once it accepts calls, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from concurrent import futures

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-workers", type=int, required=True)
    parser.add_argument("--max-message-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--cpu", type=int, default=None,
                        help="run every thread on this CPU (as lossgrad serve --io-cpu)")
    args = parser.parse_args()
    if args.cpu is not None:  # before gRPC starts its threads: they inherit it
        os.sched_setaffinity(0, {args.cpu})

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=None, response_serializer=None),
    })
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.max_workers),
        handlers=[handler],
        options=[("grpc.max_send_message_length", args.max_message_bytes),
                 ("grpc.max_receive_message_length", args.max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"echo serving on {args.host}:{port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(1.0).wait()


if __name__ == "__main__":
    main()
