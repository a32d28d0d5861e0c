"""fleetbus's broker side: identity, access and the embedded MQTT broker.

    registry.py      principals (devices, operators, readers) and their argon2 + PBKDF2 hashes
    acl.py           the one pure function that decides who may publish or subscribe where
    plugins.py       amqtt plugins: registry-backed authentication, the ACL, live revocation
    server.py        the configured, hardened embedded broker (``fleetbus broker --config``)
    mosquitto.py     the same registry and rules as Mosquitto configuration
    certs.py         a development CA and server certificate
    cli.py, registry_cli.py   ``fleetbus broker ...`` and ``fleetbus device add|list|revoke|rotate``

Importing the package is cheap: amqtt, argon2 and cryptography load only with the modules that use
them.
"""

from broker.errors import BrokerError

__all__ = ["BrokerError"]
