"""TLS, mutual TLS and bearer-token auth, with certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from lossgrad.auth import read_token_file
from lossgrad.cli import main
from lossgrad.server import LossServer, TlsConfig, create_server
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2 as pb
from lossgrad_client._proto.lossgrad.v1 import lossgrad_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_cert: Path  # a client certificate signed by other_ca
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "extendedKeyUsage=serverAuth\n")
    _leaf(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(directory, "rogue", "other-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key",
               directory / "client.crt", directory / "client.key", directory / "other-ca.crt",
               directory / "rogue.crt", directory / "rogue.key")


@pytest.fixture
def servers() -> Iterator[list[LossServer]]:
    started: list[LossServer] = []
    yield started
    for server in started:
        server.stop(0).wait(30)


def _start(servers: list[LossServer], **options: object) -> int:
    server, port = create_server("127.0.0.1", 0, warm=False, **options)  # type: ignore[arg-type]
    servers.append(server)
    return port


def _list(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None = None) -> int:
    stub = pb_grpc.LossServiceStub(channel)
    return len(stub.ListLosses(pb.ListLossesRequest(), timeout=15, metadata=metadata).losses)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_tls(pki: Pki, servers: list[LossServer]) -> None:
    tls = TlsConfig.from_files(pki.server_cert, pki.server_key)
    port = _start(servers, tls=tls)
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", trusted) as channel:
        assert _list(channel) > 0
    with grpc.secure_channel(f"localhost:{port}", trusted) as channel:
        assert _list(channel) > 0
    untrusted = grpc.ssl_channel_credentials(root_certificates=pki.other_ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", untrusted) as channel:
        assert _code(lambda: _list(channel)) is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # plaintext to a TLS port
        assert _code(lambda: _list(channel)) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_mutual_tls_needs_a_client_certificate(pki: Pki, servers: list[LossServer]) -> None:
    tls = TlsConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    port = _start(servers, tls=tls)
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", with_cert) as channel:
        assert _list(channel) > 0
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", without_cert) as channel:
        assert _code(lambda: _list(channel)) is grpc.StatusCode.UNAVAILABLE
    # A client certificate that another CA signed is refused too.
    wrong = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.rogue_key.read_bytes(),
        certificate_chain=pki.rogue_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", wrong) as channel:
        assert _code(lambda: _list(channel)) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_bearer_token(servers: list[LossServer]) -> None:
    port = _start(servers, auth_token=TOKEN)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert _list(channel, (("authorization", f"Bearer {TOKEN}"),)) > 0
        assert _list(channel, (("authorization", f"bearer {TOKEN}"),)) > 0
        for metadata in (None, (("authorization", "Bearer wrong"),),
                         (("authorization", TOKEN),), (("x-token", TOKEN),)):
            assert _code(lambda m=metadata: _list(channel, m)) is \
                grpc.StatusCode.UNAUTHENTICATED, metadata
        # Health and reflection need no token.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=15).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert "lossgrad.v1.LossService" in ProtoReflectionDescriptorDatabase(
            channel).get_services()


@pytest.mark.e2e
def test_bearer_token_over_mutual_tls(pki: Pki, servers: list[LossServer]) -> None:
    tls = TlsConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    port = _start(servers, tls=tls, auth_token=TOKEN)
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(), private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes()),
        grpc.access_token_call_credentials(TOKEN))  # sends "authorization: Bearer TOKEN"
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        assert _list(channel) > 0


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token_file(str(path)) == TOKEN
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token_file(str(path))


def test_serve_rejects_half_a_tls_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--port", "0", "--tls-cert", str(tmp_path / "x.crt")]) == 1
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--tls-client-ca", str(tmp_path / "ca.crt")]) == 1
    assert "--tls-client-ca needs" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--tls-cert", str(tmp_path / "missing.crt"),
                 "--tls-key", str(tmp_path / "missing.key")]) == 1
    assert "missing.crt" in capsys.readouterr().err
