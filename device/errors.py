"""The device package's exception tree.

DeviceError
 ├── RuntimeUnavailable   no TFLite runtime is installed
 ├── ModelLoadError       a model file could not be loaded or allocated
 ├── ConfigError          device.toml is missing, malformed or has unknown keys
 ├── StoreError           the state directory cannot be read or written as the agent needs
 └── InputError           an input source cannot be opened or gave an unusable sample
"""


class DeviceError(Exception):
    """Base of every error the device package raises on purpose."""


class RuntimeUnavailable(DeviceError):
    """No usable TFLite runtime is installed (or the one forced by FLEETBUS_RUNTIME is missing)."""


class ModelLoadError(DeviceError):
    """A model file could not be loaded or its tensors allocated."""


class ConfigError(DeviceError):
    """device.toml cannot be turned into settings; the message names the key and the fix."""


class StoreError(DeviceError):
    """A slot, staging file or state file could not be read or written."""


class InputError(DeviceError):
    """An input source could not be opened, or a sample does not fit the model's inputs."""
