"""Training data for slimopt: an offline builtin corpus, C4 streaming, or local text files, tokenized and
served as deterministic, resumable batches.

    from slimopt.data import prepare
    data = prepare("builtin", vocab_size=4096)          # or "c4", or a path to .txt/.jsonl files
    train = data.train_batches(batch_size=32, seq_len=256, seed=0)
    x = train.next_batch()                              # LongTensor [32, 256]; loss = model(input_ids=x, labels=x)
    state = train.state_dict()                          # resume: new stream, load_state_dict(state)
    val = data.val_batches(32, 256)                     # 256k held-out tokens, the same every call

Everything derived is cached under cache_dir() ($SLIMOPT_CACHE, else $XDG_CACHE_HOME/slimopt, else
~/.cache/slimopt), every entry written to a temporary name and renamed into place when complete:

    downloads/                    pinned registry archives of the builtin corpus
    builtin-v2/                   train.jsonl, val.jsonl, tune.jsonl, manifest.json
    tokenizers/<corpus>-<hash>-bpe<vocab>.json
    tokens/<corpus>-<hash>-<tokenizer hash>/   train.bin, val.bin, tune.bin (uint16 or uint32 ids), meta.json

Held-out splits (builtin and local files), by where the SHA-256 of a document's text falls in the hash range:
validation [0, 1/16), what runs report; tuning [1/16, 3/32), what `slimopt bench --lr-sweep` picks on; the
rest is train. See corpus.split_documents. Evaluations read windows spread over the whole split
(tokens.spread_windows).
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
