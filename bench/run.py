"""Run the lossgrad benchmarks and write bench/RESULTS.md (overwriting it).

    python bench/run.py [--quick] [--only SECTION] [--stream-shape BxSxV]

Sections: engine (in-process against NumPy, PyTorch and a copy floor), parallel (serial
against parallel kernels, same bits), e2e (through gRPC against a bare echo server, with
default and tuned glibc malloc), concurrency (two large requests at once), memory (server
peak RSS per request size), sidecar (a co-located client through shared memory against
local PyTorch), stream (language-model logits through ComputeStream: throughput, server and
client peak RSS), kserve (the Open Inference Protocol API under perf_analyzer, and the
Python clients), plugin (a plugin loss with lossgrad's math against libm's). ``--quick``
uses fewer repetitions and skips the largest inputs. Exits 1
if a correctness check failed. With ``--only``, the sections run replace their namesakes
in an existing RESULTS.md and the others are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import measure
from measure import (
    REPO,
    calmly,
    cpu_seconds,
    load_average,
    machine,
    source_digest,
    versions,
    wait_for_quiet,
)
from servers import MALLOC_ENV, child_env

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTIONS = ("engine", "parallel", "e2e", "concurrency", "memory", "sidecar", "stream",
            "kserve", "plugin", "catalog")
CHILD_TIMEOUT_S = 600
# Before each section, wait at most this long for other processes to leave the CPUs idle.
QUIET_WAIT_S = {False: 20.0, True: 2.0}  # by --quick
# Measurements taken under load are redone only this long into the run (bounds its time).
RETRY_WINDOW_S = {False: 390.0, True: 60.0}
MALLOC_LABEL = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())

TITLES = {
    "engine": "1. In-process engine: loss + gradient",
    "parallel": "2. Serial against parallel kernels",
    "e2e": "3. End to end through gRPC, against a bare echo server",
    "concurrency": "4. Two large requests at once",
    "memory": "5. Server peak memory per request size",
    "sidecar": "6. Co-located sidecar: shared memory against local PyTorch",
    "stream": "7. Language-model logits through ComputeStream",
    "kserve": "8. Open Inference Protocol (KServe v2): perf_analyzer and the Python clients",
    "plugin": "9. Plugin losses: lossgrad's math against libm",
    "catalog": "10. Every catalog loss against PyTorch",
}

E2E_NOTE = """\
Servers in subprocesses on 127.0.0.1: `python -m lossgrad serve --port 0` and
`bench/echo_server.py` (a generic grpcio handler returning the request bytes, identity
serializers), both with {workers} worker threads and a {mib} MiB message limit. The client
is `lossgrad_client.LossClient.compute_gradient("mse", x, y)` (float32), and for the last
row `compute_gradient("sparse_categorical_cross_entropy", logits, labels, from_logits=True)`
(256×10 float32 logits, int64 labels); the echo call sends prebuilt bytes of the request's
size (predictions + targets) and gets as many back, so it moves more bytes than lossgrad
does (whose response is the gradient). p50 / p99 over N calls after a correctness check
and one warm-up call, N bounded by a time budget per size. *lossgrad − echo − compute* is
what lossgrad spends beyond the transport floor and its own kernel: protobuf encoding and
decoding, copies, allocation. The client sends requests over 32 MiB (the 1.6e7 row) by
ComputeStream, its default.
Each table is one child process (the client) with its own two servers, all in the
environment shown.
"""


def _service_available() -> str | None:
    """None if the server factory and the client import, else why not."""
    try:
        from lossgrad.server import create_server  # noqa: F401
        from lossgrad_client import LossClient  # noqa: F401
    except ImportError as err:
        return f"lossgrad.server.create_server / lossgrad_client.LossClient unavailable: {err}"
    return None


def _service_child(section: str, quick: bool, malloc_tuned: bool,
                   untuned_server: bool = False, io_cpu: bool = False) -> tuple[str, list[str]]:
    """Run a service_bench section in a child process; timing sections are measured again
    (full mode) if other processes used more than a quarter of a core meanwhile."""
    def once() -> tuple[str, list[str]]:
        return _service_child_once(section, quick, malloc_tuned, untuned_server, io_cpu)

    if section == "memory":
        return once()
    (markdown, problems), other = calmly(once, max_wait_s=2.0 if quick else 10.0,
                                         attempts=1 if quick else 2)
    load = f"\nOther processes used {100 * other:.0f}% of one core meanwhile.\n"
    return markdown + load, problems


def _service_child_once(section: str, quick: bool, malloc_tuned: bool,
                        untuned_server: bool, io_cpu: bool) -> tuple[str, list[str]]:
    args = [str(HERE / "service_bench.py"), "--section", section]
    args += ["--untuned-server"] if untuned_server else []
    args += ["--io-cpu"] if io_cpu else []
    return _child(section, args, quick, child_env(malloc_tuned))


def _child(section: str, args: list[str], quick: bool,
           env: dict[str, str]) -> tuple[str, list[str]]:
    """Run a bench script that writes ``{"markdown", "problems"}`` to ``--out``."""
    with tempfile.TemporaryDirectory(prefix="lossgrad-bench-") as tmp:
        out = Path(tmp) / "result.json"
        args = [sys.executable, *args, "--out", str(out)] + (["--quick"] if quick else [])
        done = subprocess.run(args, env=env, timeout=CHILD_TIMEOUT_S, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{section} child failed with exit status {done.returncode}")
        result = json.loads(out.read_text())
    return result["markdown"], list(result["problems"])


def _engine(quick: bool) -> tuple[str, list[str]]:
    import engine_bench

    return engine_bench.run(quick)


def _parallel(quick: bool) -> tuple[str, list[str]]:
    import parallel_bench

    return parallel_bench.run(quick)


def _malloc_configs() -> list[tuple[str, bool, bool]]:
    """(heading, malloc variables set, lossgrad serve's own tuning off) per table."""
    from servers import server_tunes_allocator

    configs = [("default environment", False, False), (MALLOC_LABEL, True, False)]
    if server_tunes_allocator():
        configs.insert(0, ("glibc defaults everywhere (lossgrad serve's own tuning off)",
                           False, True))
    return configs


MALLOC_NOTE = """\
Tables by allocator setting. Since `lossgrad serve` tunes glibc malloc itself
(`lossgrad.server.tune_allocator`: `mallopt` keeps up to 1 GiB of freed large blocks for
reuse, unless either variable below is set), *default environment* means a tuned lossgrad
server but a client and echo server on glibc's defaults; *glibc defaults everywhere*
starts `lossgrad serve` with that tuning replaced by a no-op (a bench-only launcher); the
last table sets {label} for the client and both servers.
"""


def _by_malloc_config(section: str, quick: bool) -> tuple[str, list[str]]:
    from servers import server_tunes_allocator

    text = MALLOC_NOTE.format(label=MALLOC_LABEL) + "\n" if server_tunes_allocator() else ""
    problems: list[str] = []
    for label, tuned, untuned_server in _malloc_configs():
        print(f"  {section} with {label}", flush=True)
        markdown, found = _service_child(section, quick, tuned, untuned_server)
        text += f"### {label}\n\n{markdown}\n"
        problems += found
    return text, problems


IO_CPU_LABEL = "default environment, call threads on one CPU (lossgrad serve --io-cpu auto)"
IO_CPU_NOTE = """\
`lossgrad serve --io-cpu auto` keeps its gRPC and Python threads on the highest CPU this
process may use (numba's kernel threads stay on every CPU); the echo server runs all its
threads on that CPU too (`bench/echo_server.py --cpu`), so both sides get the same help.
The client is not pinned.
"""


def _e2e(quick: bool) -> tuple[str, list[str]]:
    from servers import MAX_MESSAGE_BYTES, max_workers

    note = E2E_NOTE.format(workers=max_workers(), mib=MAX_MESSAGE_BYTES // 2**20)
    text, problems = _by_malloc_config("e2e", quick)
    print(f"  e2e with {IO_CPU_LABEL}", flush=True)
    markdown, found = _service_child("e2e", quick, False, io_cpu=True)
    text += f"### {IO_CPU_LABEL}\n\n{IO_CPU_NOTE}\n{markdown}\n"
    return note + "\n" + text, problems + found


def _concurrency(quick: bool) -> tuple[str, list[str]]:
    return _service_child("concurrency", quick, False)


def _memory(quick: bool) -> tuple[str, list[str]]:
    from service_bench import MEMORY_NOTE

    text, problems = _by_malloc_config("memory", quick)
    return MEMORY_NOTE + "\n" + text, problems


def _sidecar(quick: bool) -> tuple[str, list[str]]:
    import sidecar_bench

    return sidecar_bench.run(quick)


stream_shape: str | None = None  # --stream-shape


def _stream(quick: bool) -> tuple[str, list[str]]:
    shape = ["--shape", stream_shape] if stream_shape else []
    return _child("stream", [str(HERE / "stream_bench.py"), *shape], quick, child_env(True))


def _kserve(quick: bool) -> tuple[str, list[str]]:
    import kserve_bench

    return kserve_bench.run(quick)


def _plugin(quick: bool) -> tuple[str, list[str]]:
    import plugin_bench

    return plugin_bench.run(quick)


def _catalog(quick: bool) -> tuple[str, list[str]]:
    import catalog_bench

    return catalog_bench.run(quick)


RUNNERS: dict[str, Callable[[bool], tuple[str, list[str]]]] = {
    "engine": _engine,
    "parallel": _parallel,
    "e2e": _e2e,
    "concurrency": _concurrency,
    "memory": _memory,
    "sidecar": _sidecar,
    "stream": _stream,
    "kserve": _kserve,
    "plugin": _plugin,
    "catalog": _catalog,
}
NEEDS_SERVICE = {"e2e", "concurrency", "memory", "sidecar", "stream", "kserve"}


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = script.name
    return " ".join(["python", shown] + [shlex.quote(a) for a in sys.argv[1:]])


def _header(command: str, started: datetime.datetime, load_start: str, elapsed_s: float,
            other_cpu_s: float, quick: bool) -> str:
    import numba

    lines = ["# lossgrad benchmarks", "",
             "Written by `bench/run.py` from one run; rerun it rather than editing this file.",
             "", "## Setup", "",
             f"- **Command**: `{command}`" + (" (quick mode)" if quick else ""),
             f"- **Date**: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}"
             f" (took {elapsed_s / 60:.1f} min)"]
    facts = machine()
    lines.append(f"- **Machine**: {facts['cpu']}, {facts['cores']}, {facts['memory']} RAM, "
                 f"{facts['os']}")
    lines.append(f"- **Load average** at start: {load_start}; at end: {load_average()}. "
                 f"Other processes used {other_cpu_s:.0f} CPU-seconds during the run "
                 f"({100 * other_cpu_s / max(elapsed_s, 1e-9):.0f}% of one core on average)")
    if other_cpu_s > 0.25 * elapsed_s:
        lines.append("- **Warning**: other processes competed for the CPUs during this run; "
                     "timings (above all p90/p99 and parallel kernels) are noisier than on "
                     "an idle machine")
    lines.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in versions().items())
                 + f"; sources digest {source_digest()} (`bench/measure.py:source_digest`)")
    try:
        layer = numba.threading_layer()  # the one a parallel kernel in this run used
    except ValueError:
        layer = os.environ.get("NUMBA_THREADING_LAYER", "threadsafe (lossgrad's default)")
    features = (numba.config.CPU_FEATURES or "").split(",")
    width = ("512-bit vectors (AVX-512; `LOSSGRAD_AVX512=0` keeps LLVM's 256-bit choice)"
             if "-prefer-256-bit" in features else "LLVM's default vector width")
    lines.append(f"- **numba**: {numba.config.NUMBA_NUM_THREADS} threads, threading layer "
                 f"{layer}, {width}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    lines.append("- **Environment**: glibc malloc variables "
                 + (" ".join(f"{k}={v}" for k, v in malloc.items()) if malloc else "unset")
                 + " (sections 1, 2 and 4; sections 3 and 5 set them per table)")
    return "\n".join(lines) + "\n"


def _merged(existing: str, sections: dict[str, str], header: str) -> str:
    """``existing`` RESULTS.md with the given sections (by title) replaced or added, each
    preceded by the setup of the run that produced it."""
    parts = re.split(r"(?m)^(?=## )", existing)
    blocks = {part.splitlines()[0][3:].strip(): part for part in parts[1:]}
    setup = header.split("## Setup", 1)[1].strip()
    for title, text in sections.items():
        blocks[title] = (f"## {title}\n\n*From a separate run of this section:*\n\n"
                         f"{setup}\n\n{text.strip()}\n\n")
    if "Problems" in blocks:  # a rerun section's old problems go; the run lists its own
        rerun = tuple(f"- {name}: " for name, title in TITLES.items() if title in sections)
        kept = [line for line in blocks["Problems"].splitlines()[1:]
                if line.strip() and not line.startswith(rerun)]
        if kept:
            blocks["Problems"] = "## Problems\n\n" + "\n".join(kept) + "\n\n"
        else:
            del blocks["Problems"]
    order = [t for t in TITLES.values() if t in blocks]
    rest = [t for t in blocks if t not in order]
    return parts[0] + "".join(blocks[t] if blocks[t].endswith("\n\n") else blocks[t] + "\n"
                              for t in [*[t for t in rest if t == "Setup"], *order,
                                        *[t for t in rest if t != "Setup"]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, no 1.6e7 / 2048x32000 inputs (~2 min)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--stream-shape", metavar="BxSxV",
                        help="logits shape of the stream section (default 8x2048x32000: "
                             "2 GiB, about 7 GiB of client memory; 1x1024x32000 with "
                             "--quick)")
    args = parser.parse_args()
    global stream_shape
    stream_shape = args.stream_shape
    selected = [s for s in SECTIONS if not args.only or s in args.only]

    command = _command()
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    t0 = time.monotonic()
    measure.retry_deadline = t0 + RETRY_WINDOW_S[args.quick]
    busy0, own0 = cpu_seconds()
    sources = source_digest()
    body = ""
    problems: list[str] = []
    sections: dict[str, str] = {}
    unavailable = _service_available()
    for section in selected:
        body += f"\n## {TITLES[section]}\n\n"
        start = len(body)
        if section in NEEDS_SERVICE and unavailable:
            body += f"Skipped: {unavailable}. The section runs once they exist.\n"
            continue
        waited = wait_for_quiet(QUIET_WAIT_S[args.quick])
        print(f"[{section}] (waited {waited:.0f} s for a quiet CPU)", flush=True)
        t = time.monotonic()
        busy, own = cpu_seconds()
        try:
            text, found = RUNNERS[section](args.quick)
        except Exception as err:  # one broken section must not lose the others' results
            text, found = f"Failed: `{type(err).__name__}: {err}`\n", [f"failed: {err!r}"]
        elapsed = time.monotonic() - t
        busy_end, own_end = cpu_seconds()
        other = max(0.0, (busy_end - busy) - (own_end - own)) / max(elapsed, 1e-9)
        body += (f"*Section took {elapsed:.0f} s; other processes used {100 * other:.0f}% "
                 "of one core meanwhile.*\n\n" + text)
        problems += [f"{section}: {p}" for p in found]
        sections[TITLES[section]] = body[start:] + "".join(
            f"\n**Problem**: {p}\n" for p in found)
        print(f"[{section}] {elapsed:.0f} s, other processes {100 * other:.0f}% of a core",
              flush=True)
    if source_digest() != sources:
        problems.append(f"lossgrad's sources (server/, client/) changed during the run "
                        f"(digest {sources} at the start, {source_digest()} at the end): "
                        "the tables may mix two versions of the code; rerun")
    if problems:
        body += "\n## Problems\n\n" + "".join(f"- {p}\n" for p in problems)
    busy1, own1 = cpu_seconds()
    header = _header(command, started, load_start, time.monotonic() - t0,
                     max(0.0, (busy1 - busy0) - (own1 - own0)), args.quick)
    if args.only and RESULTS.exists():
        RESULTS.write_text(_merged(RESULTS.read_text(), sections, header))
    else:
        RESULTS.write_text(header + body)
    print(f"wrote {RESULTS.relative_to(REPO)} in {time.monotonic() - t0:.0f} s")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
