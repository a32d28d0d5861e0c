"""Development certificates, and TLS and WebSocket listeners with the fleetbus plugins, over loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from broker.certs import make_dev_certs
from broker.errors import CertificateError
from schemas import topics
from tests.broker.conftest import (
    OPERATOR,
    Client,
    Credentials,
    amqtt_config,
    make_registry,
    start_amqtt,
    start_stock_amqtt,
)
from tests.helpers import free_port


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return make_registry(tmp_path_factory.mktemp("registry"))


def test_certs_name_loopback_and_chain_to_the_ca(tmp_path: Path) -> None:
    """The server certificate carries SAN 127.0.0.1 and localhost and is signed by the CA."""
    paths = make_dev_certs(tmp_path, hosts=["broker.lan"])
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.lan"}
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    assert paths.server_key.stat().st_mode & 0o077 == 0


def test_certs_refuse_to_overwrite(tmp_path: Path) -> None:
    """A second run does not silently replace an existing CA (devices pin it)."""
    make_dev_certs(tmp_path)
    with pytest.raises(CertificateError):
        make_dev_certs(tmp_path)
    make_dev_certs(tmp_path, overwrite=True)


def test_tls_listener_serves_authenticated_clients(tmp_path: Path, creds: Credentials) -> None:
    """A paho client that trusts the development CA connects over TLS, authenticates and round-trips."""
    paths = make_dev_certs(tmp_path)
    tls_port = free_port()
    with start_amqtt(creds.registry, tls_port=tls_port, certfile=paths.server_cert, keyfile=paths.server_key):
        client = Client(tls_port, OPERATOR, OPERATOR, creds.passwords[OPERATOR])
        client.paho.tls_set(ca_certs=str(paths.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        try:
            assert client.connect() == 0
            assert client.subscribe(topics.device_cmd("d1")) == 1
            client.publish(topics.device_cmd("d1"), b"over-tls")
            assert client.wait_for(b"over-tls")[-1].payload == b"over-tls"
        finally:
            client.close()


def test_tls_listener_rejects_clients_that_do_not_trust_the_ca(tmp_path: Path, creds: Credentials) -> None:
    """Without the CA the handshake fails (a raw amqtt TLS listener config, as the brief's fallback)."""
    paths = make_dev_certs(tmp_path)
    other = make_dev_certs(tmp_path / "other")
    port, tls_port = free_port(), free_port()
    tls = {
        "type": "tcp",
        "bind": f"127.0.0.1:{tls_port}",
        "ssl": True,
        "certfile": str(paths.server_cert),
        "keyfile": str(paths.server_key),
    }
    with start_stock_amqtt(creds.registry, port=port, config=amqtt_config(port, creds.registry, tls=tls)):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="x")
        client.tls_set(ca_certs=str(other.ca_cert))
        with pytest.raises(ssl.SSLError):
            client.connect("127.0.0.1", tls_port)


def test_websocket_listener_serves_authenticated_clients(creds: Credentials) -> None:
    """paho over WebSockets (path /mqtt) authenticates against the registry and gets the same ACL."""
    ws_port = free_port()
    with start_amqtt(creds.registry, ws_port=ws_port):
        client = Client(ws_port, "d1", "d1", creds.passwords["d1"], transport="websockets")
        client.paho.ws_set_options(path="/mqtt")
        try:
            assert client.connect() == 0
            assert client.subscribe(topics.device_cmd("d1")) == 1
            assert client.subscribe(topics.device_cmd("d2")) == 0x80
        finally:
            client.close()
