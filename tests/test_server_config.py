"""Every `lossgrad serve` option has an environment variable, shows in --help and has a row
in the README's Configuration table; the connection age limit makes clients reconnect."""

from __future__ import annotations

import argparse
import re
import threading
from pathlib import Path

import grpc
import pytest
from lossgrad.cli import _parser, main
from lossgrad.server import create_server
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

README = Path(__file__).resolve().parent.parent / "README.md"


def _serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in _parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]  # type: ignore[no-any-return]


def _options() -> list[argparse.Action]:
    return [a for a in _serve_parser()._actions if a.option_strings and a.dest != "help"]


def test_every_option_has_an_env_variable_help_and_a_readme_row() -> None:
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    help_text = _serve_parser().format_help()
    assert len(_options()) >= 14
    for action in _options():
        flag = action.option_strings[0]
        assert action.help and "LOSSGRAD_" in action.help, flag
        env = re.search(r"LOSSGRAD_[A-Z_]+", action.help).group(0)  # type: ignore[union-attr]
        assert env in help_text
        row = [r for r in rows if f"`{flag}`" in r]
        assert len(row) == 1, f"{flag}: no row in the README's Configuration table"
        assert f"`{env}`" in row[0], flag


def test_reflection_follows_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOSSGRAD_REFLECTION", "maybe")
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "LOSSGRAD_REFLECTION must be 0 or 1" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--grace", "-1"), ("--max-elements", "-5"),
                                             ("--max-connection-age-seconds", "inf"),
                                             ("--health-port", "70000")])
def test_bad_values_are_usage_errors(flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", flag, value])
    assert info.value.code == 2


def _join_pollers(threads: set[threading.Thread]) -> None:
    for thread in threads:
        if thread.name.endswith("(_run)"):  # grpc's own threads (poller, callback delivery)
            thread.join(10)
            assert not thread.is_alive(), f"{thread.name} still runs"


@pytest.mark.e2e
def test_connections_are_closed_at_their_max_age() -> None:
    server, port = create_server("127.0.0.1", 0, warm=False, max_connection_age_s=0.5)
    states: list[grpc.ChannelConnectivity] = []
    went_idle = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state is grpc.ChannelConnectivity.IDLE:
            went_idle.set()

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            before = set(threading.enumerate())
            channel.subscribe(watch)
            stub = pb_grpc.LossServiceStub(channel)
            assert stub.ListLosses(pb.ListLossesRequest(), timeout=15).losses
            assert went_idle.wait(15), f"the connection was not closed: {states}"
            assert stub.ListLosses(pb.ListLossesRequest(), timeout=15).losses  # reconnects
            channel.unsubscribe(watch)
            # grpc's connectivity poller thread ends at its next 0.2 s wake after unsubscribe;
            # closing the channel before then makes it raise "Channel closed!" in whatever
            # test runs next, so the channel stays open until the poller has gone.
            _join_pollers(set(threading.enumerate()) - before)
    finally:
        server.stop(0).wait(30)
