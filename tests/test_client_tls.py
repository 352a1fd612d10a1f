"""TLS, mutual TLS and bearer tokens from the client's side, against real servers.

A CA, a server certificate (SAN IP 127.0.0.1) and a client certificate are made with the
openssl command line into a temporary directory; the servers use ``lossgrad.server``'s
``TlsConfig`` and ``auth_token``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lossgrad_client import AsyncLossClient, LossClient, UnauthenticatedError, UnavailableError

server_module = pytest.importorskip("lossgrad.server")
if not hasattr(server_module, "TlsConfig"):
    pytest.skip("lossgrad.server has no TlsConfig (server TLS not implemented)",
                allow_module_level=True)
TlsConfig = server_module.TlsConfig
create_server = server_module.create_server

pytestmark = pytest.mark.e2e

TOKEN = "worker-token-0123"
TIMEOUT_S = 30.0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, ca: str, extensions: str, cwd: Path) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=lossgrad-test-{name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """PEM bytes: ca, server.{pem,key}, client.{pem,key} and other_ca (an unrelated CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cwd = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=lossgrad-test-{ca}", cwd=cwd)
    _signed("server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", cwd)
    _signed("client", "ca", "extendedKeyUsage=clientAuth\n", cwd)
    names = ("ca.pem", "other_ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return {name: (cwd / name).read_bytes() for name in names}


def _server(**kwargs: Any) -> Iterator[str]:
    server, port = create_server("127.0.0.1", 0, **kwargs)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@pytest.fixture(scope="module")
def tls_address(pki: dict[str, bytes]) -> Iterator[str]:
    yield from _server(tls=TlsConfig(pki["server.pem"], pki["server.key"]))


@pytest.fixture(scope="module")
def mtls_address(pki: dict[str, bytes]) -> Iterator[str]:
    yield from _server(tls=TlsConfig(pki["server.pem"], pki["server.key"], pki["ca.pem"]))


@pytest.fixture(scope="module")
def token_address() -> Iterator[str]:
    yield from _server(auth_token=TOKEN)


@pytest.fixture(scope="module")
def tls_token_address(pki: dict[str, bytes]) -> Iterator[str]:
    yield from _server(tls=TlsConfig(pki["server.pem"], pki["server.key"]), auth_token=TOKEN)


def _mse(address: str, **kwargs: Any) -> float:
    with LossClient(address, timeout=TIMEOUT_S, **kwargs) as client:
        loss = client.compute_loss("mse", [1.0, 3.0], [0.0, 1.0]).loss
    assert isinstance(loss, float)
    return loss


def test_tls(tls_address: str, pki: dict[str, bytes]) -> None:
    assert _mse(tls_address, root_certificates=pki["ca.pem"]) == 2.5


def test_tls_with_the_credentials_argument(tls_address: str, pki: dict[str, bytes]) -> None:
    credentials = grpc.ssl_channel_credentials(pki["ca.pem"])
    assert _mse(tls_address, credentials=credentials) == 2.5


def test_tls_async(tls_address: str, pki: dict[str, bytes]) -> None:
    async def call() -> Any:
        async with AsyncLossClient(tls_address, root_certificates=pki["ca.pem"],
                                   timeout=TIMEOUT_S) as client:
            return await client.compute_gradient("mse", [1.0, 3.0], [0.0, 1.0])

    assert list(asyncio.run(call()).gradient) == [1.0, 2.0]


def test_tls_server_refuses_plaintext(tls_address: str) -> None:
    with pytest.raises(UnavailableError):
        _mse(tls_address, retries=0)


def test_tls_server_with_an_untrusted_certificate(tls_address: str,
                                                  pki: dict[str, bytes]) -> None:
    with pytest.raises(UnavailableError):
        _mse(tls_address, root_certificates=pki["other_ca.pem"], retries=0)


def test_mutual_tls(mtls_address: str, pki: dict[str, bytes]) -> None:
    assert _mse(mtls_address, root_certificates=pki["ca.pem"], private_key=pki["client.key"],
                certificate_chain=pki["client.pem"]) == 2.5


def test_mutual_tls_refuses_a_client_without_a_certificate(
        mtls_address: str, pki: dict[str, bytes]) -> None:
    with pytest.raises(UnavailableError):
        _mse(mtls_address, root_certificates=pki["ca.pem"], retries=0)


def test_token_over_plaintext(token_address: str) -> None:
    assert _mse(token_address, token=TOKEN) == 2.5


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(token_address: str,
                                                   token: str | None) -> None:
    with pytest.raises(UnauthenticatedError) as info:
        _mse(token_address, token=token)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_token_over_tls(tls_token_address: str, pki: dict[str, bytes]) -> None:
    assert _mse(tls_token_address, root_certificates=pki["ca.pem"], token=TOKEN) == 2.5
    with pytest.raises(UnauthenticatedError):
        _mse(tls_token_address, root_certificates=pki["ca.pem"])


def test_token_over_tls_async(tls_token_address: str, pki: dict[str, bytes]) -> None:
    async def call() -> Any:
        async with AsyncLossClient(tls_token_address, root_certificates=pki["ca.pem"],
                                   token=TOKEN, timeout=TIMEOUT_S) as client:
            return await client.list_losses()

    assert any(info.name == "mse" for info in asyncio.run(call()))


@pytest.mark.parametrize("kwargs", [
    {"private_key": b"key"},
    {"certificate_chain": b"chain"},
    {"credentials": grpc.ssl_channel_credentials(), "root_certificates": b"ca"},
    {"token": ""},
    {"token": "two\nlines"},
])
def test_inconsistent_security_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LossClient("127.0.0.1:1", **kwargs)
