"""Exceptions raised by `ml`. Each carries a message a person can act on."""

from __future__ import annotations


class MLError(Exception):
    """Base error: `message` is shown to users as is; `details` is structured context."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class DatasetError(MLError):
    """The uploaded archive cannot be used (unsafe, malformed or too little data)."""


class WeightsMissingError(MLError):
    """A backbone's pretrained weight file is absent and cannot be fetched."""


class ConfigError(MLError):
    """An option has a value outside its valid choices."""


class Cancelled(MLError):
    """Raised from a progress callback to stop a fit early."""

    def __init__(self, message: str = "Cancelled by the user.") -> None:
        super().__init__(message)
