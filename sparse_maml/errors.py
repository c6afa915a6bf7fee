"""The error every module raises for a setting that cannot be used (kept apart so that any module
can raise it without importing the config schema)."""


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key (or the file)."""
