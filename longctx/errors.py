"""Errors raised for bad user input, before any heavy work starts."""


class ConfigError(ValueError):
    """A configuration value is impossible or incompatible. The message says what to change."""
