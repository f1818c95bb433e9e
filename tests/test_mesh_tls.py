"""TLS to MESH: the driver presents its client certificate and checks the server against MESH_CA_CERT."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from mesh_client import INT_ENDPOINT, LIVE_ENDPOINT

from dev.mesh_sandbox import NDOP_MAILBOX, MeshSandbox
from pipeline.core.errors import NdopError
from pipeline.mesh.config import MeshConfig
from pipeline.mesh.driver import MeshDriver
from pipeline.mesh.transport import make_client
from pipeline.lifecycle.state import WorkDir


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificate(name: str, cn: str, cwd: Path, san: str | None = None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=cwd)


@pytest.fixture(scope="module")
def tls_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshSandbox, Path]]:
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ndop-test-ca", cwd=pki)
    _certificate("server", "127.0.0.1", pki, san="IP:127.0.0.1")
    _certificate("client", "X26ABC1", pki)
    tls = {"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key"), "ca_certs": str(pki / "ca.pem")}
    with MeshSandbox(store_dir=pki.parent / "tls-store", mailboxes=(NDOP_MAILBOX, "X26ABC1"), tls=tls) as sandbox:
        yield sandbox, pki


def _config(sandbox: MeshSandbox, **changes: object) -> MeshConfig:
    settings: dict[str, object] = dict(url=sandbox.url, mailbox="X26ABC1", password=sandbox.password,
                                       shared_key=sandbox.shared_key)
    settings.update(changes)
    return MeshConfig(**settings).validate()


def test_handshake_over_mutual_tls(tls_sandbox: tuple[MeshSandbox, Path], tmp_path: Path) -> None:
    sandbox, pki = tls_sandbox
    config = _config(sandbox, client_cert=str(pki / "client.pem"), client_key=str(pki / "client.key"),
                     ca_cert=str(pki / "ca.pem"))
    with MeshDriver(config, WorkDir(tmp_path / "work")) as driver:
        driver.handshake()
        assert driver.poll().listed == 0


def test_tls_without_client_certificate_or_ca_fails_clearly(tls_sandbox: tuple[MeshSandbox, Path],
                                                             tmp_path: Path) -> None:
    sandbox, pki = tls_sandbox
    for config in (_config(sandbox, ca_cert=str(pki / "ca.pem")),  # no client certificate
                   _config(sandbox, client_cert=str(pki / "client.pem"), client_key=str(pki / "client.key"))):
        with MeshDriver(config, WorkDir(tmp_path / "work")) as driver, \
                pytest.raises(NdopError, match="MESH handshake failed: .*https://127.0.0.1.*check MESH_CLIENT_CERT"):
            driver.handshake()


@pytest.mark.parametrize("name, endpoint", [("int", INT_ENDPOINT), ("LIVE", LIVE_ENDPOINT)])
def test_endpoint_names_map_to_mesh_client_endpoints(name: str, endpoint: object) -> None:
    client = make_client(MeshConfig(url=name, mailbox="X26ABC1", password="p", shared_key="k"))
    try:
        assert client._url == endpoint.url  # type: ignore[attr-defined]
    finally:
        client.close()
