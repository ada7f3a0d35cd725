"""Training data for slimopt: an offline builtin corpus, C4 streaming, or local text files, tokenized and
served as deterministic, resumable batches.

    from slimopt.data import prepare
    data = prepare("builtin", vocab_size=4096)          # or "c4", or a path to .txt/.jsonl files
    train = data.train_batches(batch_size=32, seq_len=256, seed=0)
    x = train.next_batch()                              # LongTensor [32, 256]; loss = model(input_ids=x, labels=x)
    state = train.state_dict()                          # resume: new stream, load_state_dict(state)
    val = data.val_batches(32, 256, max_batches=8)      # the same held-out batches every call

Everything derived is cached under cache_dir() ($SLIMOPT_CACHE, else $XDG_CACHE_HOME/slimopt, else
~/.cache/slimopt), every entry written to a temporary name and renamed into place when complete:

    downloads/                    pinned registry archives of the builtin corpus
    builtin-v1/                   train.jsonl, val.jsonl, manifest.json
    tokenizers/<corpus>-<hash>-bpe<vocab>.json
    tokens/<corpus>-<hash>-<tokenizer hash>/   train.bin, val.bin (uint16 or uint32 ids), meta.json

Validation split (builtin and local files): a document is held out when the SHA-256 of its text falls in the
lowest 1/64 of the hash range, about 1.6 % of the documents; see corpus.split_documents.
"""

from slimopt.data.builtin import fetch_builtin
from slimopt.data.c4 import C4Data, PackedStream
from slimopt.data.cache import cache_dir
from slimopt.data.errors import DataUnavailable
from slimopt.data.pipeline import SOURCES, prepare
from slimopt.data.tokenizer import TextTokenizer
from slimopt.data.tokens import TokenizedCorpus, WindowStream

__all__ = [
    "SOURCES",
    "C4Data",
    "DataUnavailable",
    "PackedStream",
    "TextTokenizer",
    "TokenizedCorpus",
    "WindowStream",
    "cache_dir",
    "fetch_builtin",
    "prepare",
]
