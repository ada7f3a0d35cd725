"""The error every data source raises when it cannot be had on this machine right now."""


class DataUnavailable(RuntimeError):
    """A data source cannot be used here; the message says what is missing and how to get it."""
