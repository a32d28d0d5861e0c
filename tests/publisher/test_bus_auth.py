"""The publisher's MQTT connection against the hardened broker with a registry of principals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.registry import Registry, Role
from broker.testing import embedded_broker
from publisher.bus import BrokerAddress, Bus
from publisher.errors import BusError, ConfigError
from schemas.messages import MQTT_PORT


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A broker that admits only registered principals; yields its port and an operator's password."""
    root = tmp_path_factory.mktemp("secured")
    password = Registry.load(root / "registry.json").add("ops", Role.OPERATOR)
    with embedded_broker(registry=root / "registry.json", allow_anonymous=False) as handle:
        yield next(iter(handle.ports.values())), password


def test_operator_credentials_connect(secured: tuple[int, str]) -> None:
    """An operator with the right password connects and can subscribe to device streams."""
    port, password = secured
    with Bus(BrokerAddress(port=port, username="ops", password=password)) as bus:
        assert bus.connected
        bus.subscribe(["fleetbus/v1/dev/+/state"])


@pytest.mark.parametrize(("username", "password"), [("ops", "wrong"), (None, None), ("nobody", "x")])
def test_refused_login_is_a_bus_error(
    secured: tuple[int, str], username: str | None, password: str | None
) -> None:
    """A wrong password, no credentials or an unknown user raise BusError saying the broker refused."""
    port, _ = secured
    bus = Bus(BrokerAddress(port=port, username=username, password=password))
    with pytest.raises(BusError, match="refused the connection"):
        bus.connect(timeout=5)


def test_broker_address_parsing() -> None:
    """HOST:PORT, a bare host and mqtts:// URLs parse; nonsense says what shape is expected."""
    assert BrokerAddress.parse("10.0.0.2:1884") == BrokerAddress(host="10.0.0.2", port=1884)
    assert BrokerAddress.parse("broker.lan").port == MQTT_PORT
    secure = BrokerAddress.parse("mqtts://broker.lan")
    assert (secure.tls, secure.port) == (True, 8883)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        BrokerAddress.parse(":99999")
    with pytest.raises(ConfigError, match="not a number"):
        BrokerAddress.parse("host:port")
