"""The broker package's exception tree.

BrokerError                     anything the fleetbus broker package raises on purpose
 ├── RegistryError              the principal registry cannot do what was asked
 │    ├── RegistryFileError     the registry file is unreadable, malformed or of a newer format
 │    ├── UnknownPrincipal      no principal has that id
 │    ├── PrincipalExists       add() of an id that is already registered
 │    └── InvalidPrincipal      a bad id, role or group name
 ├── CertificateError           the development CA or server certificate cannot be made or read
 ├── ExportError                a Mosquitto configuration cannot be written
 ├── BrokerConfigError          the broker's TOML settings are missing, malformed or inconsistent
 ├── SessionStoreError          the sqlite file of sessions and retained messages cannot be used
 └── MalformedPacket            a client broke MQTT 3.1.1; its connection is closed (§4.8)

Errors from other libraries (argon2, cryptography, OSError from the file system) are translated where
they enter, so callers catch ``BrokerError`` and its children only.  Other modules of this package may
append classes to this tree; keep the drawing above in step.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error raised by ``broker``."""


class RegistryError(BrokerError):
    """The principal registry cannot do what was asked."""


class RegistryFileError(RegistryError):
    """The registry file is unreadable, malformed, or written by a newer fleetbus."""


class UnknownPrincipal(RegistryError, KeyError):
    """No principal has the given id."""

    def __str__(self) -> str:
        # KeyError's __str__ repr()s its argument; a sentence reads better in CLI output.
        return str(self.args[0]) if self.args else "unknown principal"


class PrincipalExists(RegistryError):
    """add() of an id that is already registered (rotate its password instead)."""


class InvalidPrincipal(RegistryError, ValueError):
    """A principal id, role or group name that the registry does not accept."""


class CertificateError(BrokerError):
    """The development CA or server certificate cannot be made or read."""


class ExportError(BrokerError):
    """A Mosquitto configuration cannot be written from the registry."""


class BrokerConfigError(BrokerError):
    """The broker's TOML settings are missing, malformed or inconsistent."""


class SessionStoreError(BrokerError):
    """The sqlite file that keeps sessions and retained messages cannot be opened or written."""


class MalformedPacket(BrokerError, ValueError):
    """A packet from a client that breaks MQTT 3.1.1; the text names the rule."""
