"""Progress lines for the slow steps (downloads, tokenizer training, tokenizing), on stderr."""

import sys


def report(enabled: bool, message: str) -> None:
    if enabled:
        print(f"slimopt.data: {message}", file=sys.stderr, flush=True)
