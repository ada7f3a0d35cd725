"""Small CLI inconsistencies: a malformed .jsonl corpus is one line, not a traceback; `memory --per-layer` marks
the optimizers `train --per-layer` refuses, with train's own reason."""

import pytest

from slimopt.cli import main

pytest.importorskip("transformers")


@pytest.mark.parametrize("lines, says", [
    ('{"text": "fine"}\n{"body": "no text field"}\n', 'bad.jsonl:2: each .jsonl line must be an object with a '
                                                      'string "text" field'),
    ('{"text": "fine"}\n{"text": "cut off\n', "bad.jsonl:2: not valid JSON"),
])
def test_a_malformed_jsonl_corpus_is_a_one_line_error(tmp_path, monkeypatch, capsys, lines, says):
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines)
    code = main(["data", "prepare", "--data", str(bad), "--vocab-size", "300"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("slimopt data: ") and says in err
    assert "\n" not in err and "Traceback" not in err


def test_bad_corpus_is_still_a_value_error():
    from slimopt.data.errors import BadCorpus, DataUnavailable

    assert issubclass(BadCorpus, ValueError) and issubclass(BadCorpus, DataUnavailable)


def test_memory_per_layer_marks_what_train_refuses_with_trains_reason(capsys):
    from slimopt.train.loop import TrainConfig, validate

    with pytest.raises(ValueError) as refused:
        validate(TrainConfig(model="tiny", optimizer="rso", per_layer=True))
    assert main(["memory", "--model", "tiny", "--per-layer", "--optimizers", "rso,sumo",
                 "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "refused by train" in rows["rso"] and "refused" not in rows["sumo"]
    assert f"rso: refused by train: {refused.value}" in out
