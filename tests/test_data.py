"""Calibration data loaders (`quantmint.io.data`) on small files written into tmp_path, byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from quantmint.errors import QuantmintError
from quantmint.io.data import (
    boolq_prompt,
    calibration_samples,
    detect_kind,
    read_boolq,
    read_jsonl_texts,
    read_squad,
    squad_prompt,
)
from quantmint.tools.example_models import example_model_dir
from tests.conftest import SHARED_DATA, byte_tokenizer

WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


def decode(tok: Any, ids: torch.Tensor) -> str:
    return tok.decode(ids.tolist())


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

# 50 distinct ASCII lines of 16 bytes: 800 byte tokens, 50 distinct windows of 16 (one line each).
TEXT = "".join(f"line {i:04d} text.\n" for i in range(50))


def write_text(tmp_path: Path, text: str = TEXT, name: str = "valid.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def squad_doc(n_paragraphs: int = 3, n_questions: int = 4, context: str | None = None) -> dict[str, Any]:
    paragraphs = []
    for p in range(n_paragraphs):
        qas = [
            {
                "id": f"q{p}-{q}",
                "question": f"What is item {p}.{q}?",
                "answers": [{"text": f"item{p}{q}", "answer_start": 0}, {"text": "other", "answer_start": 3}],
            }
            for q in range(n_questions)
        ]
        paragraphs.append({"context": context or f"Paragraph {p} lists items.", "qas": qas})
    return {"data": [{"title": "Items", "paragraphs": paragraphs}], "version": "1.1"}


def write_json(tmp_path: Path, obj: Any, name: str = "dev-v1.1.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


GOOGLE = [
    {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue -- mostly."},
    {"question": "is grass red", "title": "Grass", "answer": False, "passage": "Grass is green."},
    {"question": "do cats bark", "title": "Cat", "answer": False, "passage": "Cats meow."},
]
SUPERGLUE = [
    {
        "question": "is the sky blue",
        "passage": "Sky -- The sky is blue -- mostly.",
        "idx": 0,
        "label": "true",
    },
    {"question": "is grass red", "passage": "Grass -- Grass is green.", "idx": 1, "label": "false"},
    {"question": "do cats bark", "passage": "Cat -- Cats meow.", "idx": 2, "label": False},
]


def write_jsonl(tmp_path: Path, rows: list[Any], name: str = "val.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# ---------------------------------------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------------------------------------


def test_text_windows_are_exact_distinct_and_from_the_text(tmp_path: Path, tok: Any) -> None:
    path = write_text(tmp_path)
    samples = calibration_samples(path, tok, n_samples=7, seq_len=16, seed=3)
    assert len(samples) == 7
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    windows = ids[: len(ids) // 16 * 16].reshape(-1, 16)
    starts = []
    for s in samples:
        assert s.dtype == torch.int64 and s.shape == (16,)
        match = [i for i in range(len(windows)) if torch.equal(windows[i], s)]
        assert len(match) == 1, "each sample is one of the consecutive non-overlapping windows"
        starts.append(match[0])
    assert len(set(starts)) == 7, "drawn without replacement"


def test_text_deterministic_per_seed_and_different_across_seeds(tmp_path: Path, tok: Any) -> None:
    path = write_text(tmp_path)
    first = calibration_samples(path, tok, n_samples=5, seq_len=16, seed=0)
    again = calibration_samples(str(path), tok, n_samples=5, seq_len=16, seed=0, kind="text")
    other = calibration_samples(path, tok, n_samples=5, seq_len=16, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert [s.tolist() for s in first] != [s.tolist() for s in other]


@pytest.mark.parametrize("n_samples", [1, 10, 50])
def test_text_n_samples_exact_up_to_all_windows(tmp_path: Path, tok: Any, n_samples: int) -> None:
    samples = calibration_samples(write_text(tmp_path), tok, n_samples=n_samples, seq_len=16)
    assert len(samples) == n_samples
    assert len({tuple(s.tolist()) for s in samples}) == n_samples


def test_text_too_few_windows(tmp_path: Path, tok: Any) -> None:
    path = write_text(tmp_path)
    with pytest.raises(QuantmintError) as err:
        calibration_samples(path, tok, n_samples=51, seq_len=16)
    msg = str(err.value)
    assert str(path) in msg and "800 tokens" in msg and "50 windows" in msg
    assert "lower n_samples to 50" in msg and "seq_len to 15" in msg


# ---------------------------------------------------------------------------------------------------------
# JSON Lines text
# ---------------------------------------------------------------------------------------------------------

DOCS = [TEXT[: 16 * 20], TEXT[16 * 20 : 16 * 35], TEXT[16 * 35 :]]


def test_jsonl_documents_are_sampled_as_their_joined_text(tmp_path: Path, tok: Any) -> None:
    """C4/Pile-style JSON Lines: the "text" fields joined by a blank line, windowed as plain text is;
    other fields, blank lines and empty documents do not change the draw."""
    rows = [{"text": DOCS[0], "meta": {"set": "a"}}, "", {"text": "  "}, {"url": "u", "text": DOCS[1]}]
    path = write_jsonl(tmp_path, [*rows, {"text": DOCS[2], "timestamp": 1}], "docs.jsonl")
    assert detect_kind(path) == "jsonl"
    assert read_jsonl_texts(path) == DOCS
    joined = write_text(tmp_path, "\n\n".join(DOCS), "joined.txt")
    for seed in (0, 1):
        got = calibration_samples(path, tok, n_samples=20, seq_len=16, seed=seed)
        want = calibration_samples(joined, tok, n_samples=20, seq_len=16, seed=seed)
        assert [s.tolist() for s in got] == [s.tolist() for s in want]
    forced = calibration_samples(path, tok, n_samples=3, seq_len=16, kind="jsonl")
    assert [s.tolist() for s in forced] == [s.tolist() for s in calibration_samples(joined, tok, 3, 16)]


def test_jsonl_documents_errors_name_line_and_field(tmp_path: Path, tok: Any) -> None:
    neither = write_jsonl(tmp_path, ["", {"content": "x"}], "neither.jsonl")
    with pytest.raises(QuantmintError, match=r'neither\.jsonl, line 2: .*neither "text" .* nor "question"'):
        detect_kind(neither)
    assert "--calib-kind text" in _error(neither, tok)
    msg = _error(write_jsonl(tmp_path, [{"text": DOCS[0]}, {"body": "x"}], "missing.jsonl"), tok)
    assert 'missing.jsonl, line 2: missing field "text"' in msg
    msg = _error(write_jsonl(tmp_path, [{"text": DOCS[0]}, {"text": 3}], "typed.jsonl"), tok)
    assert 'typed.jsonl, line 2: field "text" must be of JSON type string, got number 3' in msg
    msg = _error(write_jsonl(tmp_path, [{"text": DOCS[0]}, '{"text": '], "broken.jsonl"), tok)
    assert "broken.jsonl, line 2 column" in msg and "invalid JSON" in msg
    msg = _error(write_jsonl(tmp_path, [{"text": ""}, {"text": " \n"}], "blank.jsonl"), tok)
    assert 'blank.jsonl: every record\'s "text" is empty' in msg
    # kind="text" (or a .txt name) reads any .jsonl as raw text
    raw = calibration_samples(neither, tok, n_samples=1, seq_len=4, kind="text")
    assert decode(tok, raw[0]) in (tmp_path / "neither.jsonl").read_text()


def test_eval_reads_jsonl_documents_and_boolq_passages(tmp_path: Path) -> None:
    from quantmint.eval.perplexity import read_text

    docs = write_jsonl(tmp_path, [{"text": d} for d in DOCS], "docs.jsonl")
    assert read_text(docs) == "\n\n".join(DOCS)
    boolq = write_jsonl(tmp_path, [*GOOGLE, GOOGLE[0]], "boolq.jsonl")
    assert read_text(boolq) == "\n\n".join(dict.fromkeys(r["passage"] for r in GOOGLE))
    bom = write_text(tmp_path, "\ufeff" + TEXT, "bom.txt")
    assert read_text(bom) == TEXT


# ---------------------------------------------------------------------------------------------------------
# SQuAD
# ---------------------------------------------------------------------------------------------------------


def test_read_squad_records_in_file_order(tmp_path: Path) -> None:
    records = read_squad(write_json(tmp_path, squad_doc()))
    assert len(records) == 12
    assert records[0] == {
        "id": "q0-0",
        "context": "Paragraph 0 lists items.",
        "question": "What is item 0.0?",
        "answers": ["item00", "other"],
    }
    assert [r["id"] for r in records[:5]] == ["q0-0", "q0-1", "q0-2", "q0-3", "q1-0"]


def test_squad_prompt_includes_first_answer(tmp_path: Path, tok: Any) -> None:
    path = write_json(tmp_path, squad_doc())
    samples = calibration_samples(path, tok, n_samples=12, seq_len=512)
    texts = sorted(decode(tok, s) for s in samples)
    expected = sorted(
        f"Paragraph {p} lists items.\nQuestion: What is item {p}.{q}?\nAnswer: item{p}{q}"
        for p in range(3)
        for q in range(4)
    )
    assert texts == expected
    assert squad_prompt("C", "Q?") + " A" == "C\nQuestion: Q?\nAnswer: A"


def test_squad_long_context_is_cut_from_the_left(tmp_path: Path, tok: Any) -> None:
    context = "START " + "x" * 300 + " END"
    path = write_json(tmp_path, squad_doc(1, 2, context=context))
    samples = calibration_samples(path, tok, n_samples=2, seq_len=64, seed=0)
    for s in samples:
        assert s.shape == (64,) and s.dtype == torch.int64
        text = decode(tok, s)
        assert text.startswith("x") and "START" not in text
        assert text.endswith(" END\nQuestion: What is item 0.0?\nAnswer: item00") or text.endswith(
            " END\nQuestion: What is item 0.1?\nAnswer: item01"
        )


def test_squad_deterministic_and_seeded(tmp_path: Path, tok: Any) -> None:
    path = write_json(tmp_path, squad_doc(5, 6))
    a = calibration_samples(path, tok, n_samples=8, seq_len=32, seed=0)
    b = calibration_samples(path, tok, n_samples=8, seq_len=32, seed=0)
    c = calibration_samples(path, tok, n_samples=8, seq_len=32, seed=7)
    assert len(a) == 8 and all(1 < len(s) <= 32 for s in a)
    assert [s.tolist() for s in a] == [s.tolist() for s in b]
    assert [s.tolist() for s in a] != [s.tolist() for s in c]


# ---------------------------------------------------------------------------------------------------------
# BoolQ
# ---------------------------------------------------------------------------------------------------------


def test_boolq_both_forms_give_the_same_records(tmp_path: Path, tok: Any) -> None:
    google = read_boolq(write_jsonl(tmp_path, GOOGLE, "google.jsonl"))
    superglue = read_boolq(write_jsonl(tmp_path, SUPERGLUE, "superglue.jsonl"))
    assert google == superglue
    assert google[0] == {
        "question": "is the sky blue",
        "title": "Sky",
        "passage": "The sky is blue -- mostly.",  # split on the first " -- " only
        "answer": True,
    }
    assert [r["answer"] for r in superglue] == [True, False, False]
    a = calibration_samples(tmp_path / "google.jsonl", tok, n_samples=3, seq_len=128, seed=5)
    b = calibration_samples(tmp_path / "superglue.jsonl", tok, n_samples=3, seq_len=128, seed=5)
    assert [s.tolist() for s in a] == [s.tolist() for s in b]


def test_boolq_prompt_and_answers(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path, ["", *SUPERGLUE, "  "])  # blank lines are skipped
    texts = sorted(decode(tok, s) for s in calibration_samples(path, tok, n_samples=3, seq_len=512))
    assert texts == sorted(
        [
            "The sky is blue -- mostly.\nQuestion: is the sky blue?\nAnswer: yes",
            "Grass is green.\nQuestion: is grass red?\nAnswer: no",
            "Cats meow.\nQuestion: do cats bark?\nAnswer: no",
        ]
    )
    assert boolq_prompt("P", "is it?") == boolq_prompt("P", "is it") == "P\nQuestion: is it?\nAnswer:"


def test_boolq_long_passage_keeps_question_and_answer(tmp_path: Path, tok: Any) -> None:
    row = {"question": "is it long", "passage": "T -- " + "word " * 100, "idx": 0, "label": "true"}
    (sample,) = calibration_samples(write_jsonl(tmp_path, [row]), tok, n_samples=1, seq_len=40)
    assert len(sample) == 40 and decode(tok, sample).endswith("\nQuestion: is it long?\nAnswer: yes")


# ---------------------------------------------------------------------------------------------------------
# Kind detection
# ---------------------------------------------------------------------------------------------------------


def test_auto_kind_by_name_and_content(tmp_path: Path) -> None:
    assert detect_kind(write_json(tmp_path, squad_doc())) == "squad"
    assert detect_kind(write_jsonl(tmp_path, GOOGLE)) == "boolq"
    assert detect_kind(write_text(tmp_path)) == "text"
    assert detect_kind(write_text(tmp_path, name="wiki.test.tokens")) == "text"
    not_squad = write_json(tmp_path, {"rows": []}, "other.json")
    with pytest.raises(QuantmintError, match=r'other\.json is JSON without a top-level "data"'):
        detect_kind(not_squad)


# ---------------------------------------------------------------------------------------------------------
# Errors: each names the file, the place (line or index) and the field
# ---------------------------------------------------------------------------------------------------------


def _error(path: Path, tok: Any, **kwargs: Any) -> str:
    with pytest.raises(QuantmintError) as err:
        calibration_samples(path, tok, **{"n_samples": 1, "seq_len": 16, **kwargs})
    return str(err.value)


def test_missing_file(tmp_path: Path, tok: Any) -> None:
    for name in ("nope.txt", "nope.json", "nope.jsonl"):
        msg = _error(tmp_path / name, tok)
        assert str(tmp_path / name) in msg and "does not exist" in msg
    with pytest.raises(QuantmintError, match="does not exist"):
        read_squad(tmp_path / "nope.json")
    with pytest.raises(QuantmintError, match="does not exist"):
        read_boolq(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["empty.txt", "empty.json", "empty.jsonl"])
@pytest.mark.parametrize("content", ["", " \n\n "])
def test_empty_file(tmp_path: Path, tok: Any, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    msg = _error(path, tok)
    assert str(path) in msg and "is empty" in msg


@pytest.mark.parametrize(
    ("name", "value"), [("n_samples", 0), ("n_samples", -3), ("seq_len", 0), ("seq_len", -1), ("seq_len", 1)]
)
def test_sizes_must_be_positive(tmp_path: Path, tok: Any, name: str, value: int) -> None:
    msg = _error(write_text(tmp_path), tok, **{name: value})
    assert name in msg and str(value) in msg


def test_unknown_kind(tmp_path: Path, tok: Any) -> None:
    msg = _error(write_text(tmp_path), tok, kind="csv")
    assert "'csv'" in msg and "squad" in msg


def test_jsonl_invalid_json_names_line(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path, [*SUPERGLUE[:2], '{"question": "x", '])
    msg = _error(path, tok)
    assert f"{path}, line 3" in msg and "invalid JSON" in msg


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"passage": "T -- p", "label": "true"}, "question", "missing"),
        ({"question": "q", "label": "true"}, "passage", "missing"),
        ({"question": "q", "passage": "p"}, "answer", "missing"),  # neither form
        ({"question": "q", "passage": "p", "answer": True}, "title", "missing"),
        ({"question": 3, "passage": "T -- p", "label": "true"}, "question", "got number"),
        ({"question": "q", "title": "T", "passage": "p", "answer": "yes"}, "answer", "got string"),
        ({"question": "q", "passage": "T -- p", "label": 1}, "label", "got number"),
        ({"question": "q", "passage": "T -- p", "label": "maybe"}, "label", "'maybe'"),
        ({"question": "q", "passage": "no separator", "label": "true"}, "passage", '" -- "'),
    ],
)
def test_jsonl_bad_record_names_line_and_field(
    tmp_path: Path, tok: Any, row: dict[str, Any], field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path, [SUPERGLUE[0], GOOGLE[1], "", row])
    msg = _error(path, tok)
    assert f"{path}, line 4" in msg and f'"{field}"' in msg and problem in msg
    with pytest.raises(QuantmintError, match="line 4"):
        read_boolq(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path, tok: Any) -> None:
    msg = _error(write_jsonl(tmp_path, [GOOGLE[0], [1, 2]]), tok)
    assert "line 2: must be a JSON object, got array" in msg


def test_json_invalid_names_line(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "dev.json"
    path.write_text('{"data": [\n  {"title": "T",\n   "paragraphs": [,]}\n]}')
    msg = _error(path, tok)
    assert str(path) in msg and "line 3" in msg and "invalid JSON" in msg
    with pytest.raises(QuantmintError, match="line 3"):
        read_squad(path)


def _squad_with(edit: str) -> dict[str, Any]:
    doc = squad_doc(3, 4)
    paragraph = doc["data"][0]["paragraphs"][2]
    qa = paragraph["qas"][1]
    if edit == "no question":
        del qa["question"]
    elif edit == "no id":
        del qa["id"]
    elif edit == "question int":
        qa["question"] = 7
    elif edit == "no answers":
        del qa["answers"]
    elif edit == "empty answers":
        qa["answers"] = []
    elif edit == "answer text":
        qa["answers"][1] = {"answer_start": 3}
    elif edit == "no context":
        del paragraph["context"]
    elif edit == "qas dict":
        paragraph["qas"] = {}
    return doc


@pytest.mark.parametrize(
    ("edit", "place", "field", "problem"),
    [
        ("no question", "article 0 paragraph 2 question 1", "question", "missing"),
        ("no id", "article 0 paragraph 2 question 1", "id", "missing"),
        ("question int", "article 0 paragraph 2 question 1", "question", "got number"),
        ("no answers", "article 0 paragraph 2 question 1", "answers", "missing"),
        ("empty answers", "article 0 paragraph 2 question 1", "answers", "empty"),
        (
            "answer text",
            "article 0 paragraph 2 question 1 (data[0].paragraphs[2].qas[1]), answer 1",
            "text",
            "",
        ),
        ("no context", "article 0 paragraph 2 (data[0].paragraphs[2])", "context", "missing"),
        ("qas dict", "article 0 paragraph 2", "qas", "got object"),
    ],
)
def test_json_bad_record_names_index_and_field(
    tmp_path: Path, tok: Any, edit: str, place: str, field: str, problem: str
) -> None:
    path = write_json(tmp_path, _squad_with(edit))
    msg = _error(path, tok)
    assert f"{path}, {place}" in msg and f'"{field}"' in msg and problem in msg
    with pytest.raises(QuantmintError, match="article 0 paragraph 2"):
        read_squad(path)


def test_json_structure_errors(tmp_path: Path, tok: Any) -> None:
    msg = _error(write_json(tmp_path, {"data": {}}), tok)
    assert '"data"' in msg and "must be of JSON type array, got object" in msg
    msg = _error(write_json(tmp_path, {"data": [{"title": "T"}]}), tok)
    assert "article 0" in msg and '"paragraphs"' in msg and "missing" in msg
    msg = _error(write_json(tmp_path, {"data": []}), tok)
    assert "no questions" in msg
    with pytest.raises(QuantmintError, match=r"top level must be a JSON object .*, got array"):
        read_squad(write_json(tmp_path, [1]))


def test_too_few_questions_or_records(tmp_path: Path, tok: Any) -> None:
    msg = _error(write_json(tmp_path, squad_doc(1, 2)), tok, n_samples=3)
    assert "has 2 questions" in msg and "n_samples=3" in msg and "lower n_samples to 2" in msg
    msg = _error(write_jsonl(tmp_path, GOOGLE), tok, n_samples=4)
    assert "has 3 records" in msg and "lower n_samples to 3" in msg


# ---------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wikitext2_valid_128x512_with_smollm2_tokenizer() -> None:
    if not WIKITEXT_VALID.exists():
        pytest.skip(f"{WIKITEXT_VALID} is not here (the shared data folder sits beside the repository)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(example_model_dir("smollm2"))
    samples = calibration_samples(WIKITEXT_VALID, tokenizer, n_samples=128, seq_len=512, seed=0)
    assert len(samples) == 128
    assert all(s.shape == (512,) and s.dtype == torch.int64 for s in samples)
    assert len({tuple(s.tolist()) for s in samples}) == 128
    again = calibration_samples(WIKITEXT_VALID, tokenizer, n_samples=128, seq_len=512, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(samples, again, strict=True))
