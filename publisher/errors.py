"""The publisher package's exception tree.

PublisherError                  anything the publisher side refuses or fails to do
 ├── PlanError                  a model file or plan option that cannot become a manifest
 ├── ConfigError                an operator config, target list or CLI option that makes no sense
 ├── BusError                   the broker could not be reached, refused us, or dropped us
 ├── RolloutError               a rollout that could not be published or followed
 │    └── RolloutTimeout        targets still not terminal when the follow deadline passed
 └── StoreError                 the aggregator's database could not be opened or written

Errors from paho, sqlite3 and the filesystem are translated where they enter (``raise X(...) from
None``) so callers catch one tree.
"""

from __future__ import annotations


class PublisherError(Exception):
    """Base of every error raised by ``publisher``."""


class PlanError(PublisherError):
    """A model file or option that cannot be turned into a manifest; the text says what to fix."""


class ConfigError(PublisherError):
    """An operator config, target or option that is invalid."""


class BusError(PublisherError):
    """The MQTT broker could not be reached, refused the credentials, or dropped the connection."""


class RolloutError(PublisherError):
    """A rollout that could not be published or followed."""


class RolloutTimeout(RolloutError):
    """Some targets had not reached a terminal state when the deadline passed."""


class StoreError(PublisherError):
    """The aggregator's store could not be opened, migrated or written."""
