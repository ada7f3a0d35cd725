"""The error every data source raises when it cannot be had on this machine right now."""


class DataUnavailable(RuntimeError):
    """A data source cannot be used here; the message says what is missing and how to get it."""


class BadCorpus(DataUnavailable, ValueError):
    """A local corpus file that cannot be read as one: a malformed .jsonl line, or text that is not UTF-8. A
    ValueError, and a DataUnavailable so that the CLI reports it in one line, wherever it is found."""
