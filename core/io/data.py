"""Calibration data from local files: plain text, JSON Lines text, SQuAD v1.1 and BoolQ (no downloads).

In the spirit of MindSpore Golden Stick's `get_datasets`: one call turns a dataset file into
`n_samples` token-id tensors for calibrating activation statistics. Nothing is fetched from the
network; point `path` at a file you already have (wikitext-2's `valid.txt`, SQuAD's `dev-v1.1.json`,
BoolQ's `val.jsonl`).

Formats (`kind`; `"auto"` picks by file name, see `detect_kind`):

- `"text"`: a UTF-8 plain-text file (wikitext-2 as shipped, lines and all). The whole text is tokenized
  without special tokens and cut into consecutive, non-overlapping windows of exactly `seq_len` tokens
  (a shorter tail is dropped); `n_samples` windows are drawn at random without replacement.
- `"jsonl"`: JSON Lines of documents, one object per line with a string field `"text"` (other fields are
  ignored): the form of C4, the Pile and most calibration sets. The documents, in file order, are joined
  by a blank line and sampled as `"text"` is.
- `"squad"`: SQuAD v1.1 JSON, `{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
  "answers": [{"text", "answer_start"}]}]}]}]}`. One prompt per question::

      f"{context}\\nQuestion: {question}\\nAnswer:" + " " + first_answer_text

  Calibration sees the answer too. A prompt longer than `seq_len` tokens keeps its last `seq_len`
  tokens, so the context is cut from its left and the question and answer survive.
- `"boolq"`: BoolQ JSONL, one object per line, in either form (both may be mixed in one file):
  Google's original `{"question", "title", "answer": bool, "passage"}` or SuperGLUE's
  `{"question", "passage", "idx", "label"}`, whose passage is `"<title> -- <text>"` (split on the first
  `" -- "` only) and whose label is `"true"`/`"false"` (or a JSON bool). One prompt per record, built
  from the normalised record (the passage without its title)::

      f"{passage}\\nQuestion: {question}?\\nAnswer:" + (" yes" if answer else " no")

  A question that already ends in "?" does not get a second one. Long prompts are cut from the left,
  as for SQuAD.

All samples are tokenized with `add_special_tokens=False` (no BOS/EOS), as `quantmint.eval.perplexity`
does; prepend a BOS yourself if your model needs one. Sampling uses
`torch.Generator().manual_seed(seed)` and `torch.randperm`, so the same file, tokenizer, sizes and seed
always give the same samples in the same (random) order.

`read_squad` and `read_boolq` are the format readers on their own, for evaluation code. Every problem
with a file raises `QuantmintError` naming the file, where in it (JSONL: 1-based line; JSON: line of a
syntax error, else the article/paragraph/question index counted from 0), the field, and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from quantmint.errors import QuantmintError

__all__ = [
    "calibration_samples",
    "read_squad",
    "read_boolq",
    "read_jsonl_texts",
    "squad_prompt",
    "boolq_prompt",
    "detect_kind",
    "DataKind",
]

DataKind = Literal["auto", "text", "jsonl", "squad", "boolq"]
_KINDS = ("auto", "text", "jsonl", "squad", "boolq")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def calibration_samples(
    path: str | Path,
    tokenizer: Any,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    kind: DataKind = "auto",
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """`n_samples` calibration samples drawn from the local file `path` (formats: module docstring).

    Returns a list of `n_samples` 1-D int64 tensors of token ids, each of length in `[2, seq_len]`
    (`"text"` samples are exactly `seq_len` long). The draw depends only on the file, the tokenizer,
    `n_samples`, `seq_len` and `seed`. With `vocab_size` (the model's), a token id the model has no
    embedding for is refused: the tokenizer is not the model's.
    """
    path = Path(path)
    _check_positive("n_samples", n_samples, 1)
    _check_positive("seq_len", seq_len, 2)
    if kind not in _KINDS:
        raise QuantmintError(f"unknown calibration data kind {kind!r}: use one of {', '.join(_KINDS)}")
    raw = _read_utf8(path)
    parsed = None
    if kind == "auto":
        kind, parsed = _detect(path, raw)
    generator = torch.Generator().manual_seed(seed)
    if kind in ("text", "jsonl"):
        text = raw if kind == "text" else "\n\n".join(_jsonl_texts(path, raw))
        samples = _text_samples(path, text, tokenizer, n_samples, seq_len, generator)
        return _check_vocab(path, samples, tokenizer, vocab_size)
    if kind == "squad":
        top = _load_json(path, raw) if parsed is None else parsed
        records = _squad_records(path, top)
        prompts = [squad_prompt(r["context"], r["question"]) + " " + r["answers"][0] for r in records]
        what = "questions"
    else:
        prompts = [
            boolq_prompt(r["passage"], r["question"]) + (" yes" if r["answer"] else " no")
            for r in _boolq(path, raw)
        ]
        what = "records"
    samples = _prompt_samples(path, prompts, what, tokenizer, n_samples, seq_len, generator)
    return _check_vocab(path, samples, tokenizer, vocab_size)


def _check_vocab(
    path: Path, samples: list[torch.Tensor], tokenizer: Any, vocab_size: int | None
) -> list[torch.Tensor]:
    """`samples`, unless a token id is beyond the model's vocabulary (an IndexError in the embedding)."""
    if vocab_size is None or not samples:
        return samples
    top = max(int(sample.max()) for sample in samples)
    if top >= vocab_size:
        try:
            size = f"{len(tokenizer):,} tokens"
        except TypeError:
            size = "unknown size"
        raise QuantmintError(
            f"{path} tokenizes to id {top:,}, but the model's vocabulary has {vocab_size:,} entries "
            f"(the tokenizer has {size}): the tokenizer does not belong to this model; use the model's own"
        )
    return samples


def detect_kind(path: str | Path) -> Literal["text", "jsonl", "squad", "boolq"]:
    """The data kind `"auto"` resolves to: `.json` with a top-level `"data"` is SQuAD; `.jsonl` whose first
    record has a `"text"` field and no `"question"` is JSON Lines text, one with a `"question"` is BoolQ;
    any other name is plain text. A `.json` file without `"data"` and a `.jsonl` file whose first record
    has neither field are errors (neither is calibration text as it is).
    """
    path = Path(path)
    kind, _ = _detect(path, _read_utf8(path) if path.suffix.lower() in (".json", ".jsonl") else "")
    return kind


def _detect(path: Path, raw: str) -> tuple[Literal["text", "jsonl", "squad", "boolq"], Any]:
    """`detect_kind`, plus the parsed JSON of a `.json` file (None otherwise) so it is parsed once."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_kind(path, raw), None
    if suffix != ".json":
        return "text", None
    obj = _load_json(path, raw)
    if isinstance(obj, dict) and "data" in obj:
        return "squad", obj
    raise QuantmintError(
        f"{path} is JSON without a top-level \"data\" field, so it is not SQuAD v1.1: pass kind='squad' "
        "(CLI: --calib-kind squad) for a SQuAD file (to see what is wrong), kind='text' (--calib-kind "
        "text) to calibrate on its raw text, or kind='boolq' (--calib-kind boolq) for BoolQ lines"
    )


def _jsonl_kind(path: Path, raw: str) -> Literal["jsonl", "boolq"]:
    """What a `.jsonl` file holds, by its first record: documents (`"text"`) or BoolQ (`"question"`).
    A first line that is not a JSON object is left to the BoolQ reader, whose error names it."""
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            first = json.loads(line)
        except (ValueError, RecursionError):  # the reader's error names the line
            return "boolq"
        if not isinstance(first, dict) or "question" in first:
            return "boolq"
        if "text" in first:
            return "jsonl"
        raise QuantmintError(
            f'{path}, line {lineno}: a JSON Lines record with neither "text" (one document per line) nor '
            '"question" (BoolQ): name the documents\' field "text", or read the file as raw text with '
            "kind='text' (CLI: --calib-kind text)"
        )
    return "boolq"  # only blank lines: _read_utf8 refused that already


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The `"text"` of every record of a JSON Lines file, in file order (blank lines skipped, every record
    an object with a string `"text"`; empty documents are dropped, a file of only empty ones refused)."""
    path = Path(path)
    return _jsonl_texts(path, _read_utf8(path))


def _jsonl_records(path: Path, raw: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Each record of a JSON Lines text with where it is (`"<path>, line N"`), blank lines skipped; a line
    that is not one JSON object is refused by its number."""
    # split on "\n" only: str.splitlines() would also break at U+2028 inside strings and miscount lines.
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantmintError(
                f"{where} column {exc.colno}: invalid JSON ({exc.msg}): each line must be one JSON object"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise QuantmintError(
                f"{where}: JSON this reader refuses ({_json_refusal(exc)}): fix the line"
            ) from None
        _check_object(obj, where)
        yield obj, where


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts: list[str] = []
    for obj, where in _jsonl_records(path, raw):
        text = _field(obj, "text", str, where)
        if text.strip():
            texts.append(text)
    if not texts:
        raise QuantmintError(f'{path}: every record\'s "text" is empty: give a file with text')
    return texts


def squad_prompt(context: str, question: str) -> str:
    """The SQuAD prompt up to and including "Answer:" (calibration appends " " + the first answer)."""
    return f"{context}\nQuestion: {question}\nAnswer:"


def boolq_prompt(passage: str, question: str) -> str:
    """The BoolQ prompt up to and including "Answer:" (calibration appends " yes" or " no").

    `question` gets a "?" unless it already ends in one (BoolQ's questions have none).
    """
    question = question[:-1] if question.endswith("?") else question
    return f"{passage}\nQuestion: {question}?\nAnswer:"


def read_squad(path: str | Path) -> list[dict[str, Any]]:
    """Every question of a SQuAD v1.1 JSON file, in file order.

    Returns dicts `{"id": str, "context": str, "question": str, "answers": list[str]}`; `answers` holds
    each annotation's `text` in file order (duplicates kept, at least one: SQuAD v2.0's unanswerable
    questions are refused). `title` and `answer_start` are not needed and not checked.
    """
    path = Path(path)
    return _squad_records(path, _load_json(path, _read_utf8(path)))


def read_boolq(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a BoolQ JSONL file (Google or SuperGLUE form, see module docstring), in file order.

    Returns dicts `{"question": str, "title": str, "passage": str, "answer": bool}`; a SuperGLUE
    `"<title> -- <text>"` passage is split on its first `" -- "`. Blank lines are skipped.
    """
    path = Path(path)
    return _boolq(path, _read_utf8(path))


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantmintError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        need = "positive" if minimum == 1 else f"at least {minimum} (a sample needs 2 tokens)"
        raise QuantmintError(f"{name} must be {need}, got {value}: pass {name}={max(minimum, 1)} or more")


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: whole-file text is longer than the model's max length on purpose.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _text_samples(
    path: Path, raw: str, tokenizer: Any, n_samples: int, seq_len: int, generator: torch.Generator
) -> list[torch.Tensor]:
    ids = torch.tensor(_token_ids(tokenizer, [raw])[0], dtype=torch.int64)
    n_windows = len(ids) // seq_len
    if n_windows < n_samples:
        fixes = [f"lower n_samples to {n_windows}"] if n_windows else []
        if len(ids) // n_samples >= 2:
            fixes.append(f"lower seq_len to {len(ids) // n_samples}")
        fixes.append("use a longer text")
        raise QuantmintError(
            f"{path} has {len(ids)} tokens, which make {n_windows} windows of seq_len={seq_len}, fewer than "
            f"n_samples={n_samples}: {', or '.join(fixes)}"
        )
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    picks = torch.randperm(n_windows, generator=generator)[:n_samples]
    return [windows[i].clone() for i in picks.tolist()]


def _prompt_samples(
    path: Path,
    prompts: list[str],
    what: str,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    if len(prompts) < n_samples:
        raise QuantmintError(
            f"{path} has {len(prompts)} {what}, fewer than n_samples={n_samples}: lower n_samples to "
            f"{len(prompts)} or use a larger file"
        )
    picks = torch.randperm(len(prompts), generator=generator)[:n_samples].tolist()
    encoded = _token_ids(tokenizer, [prompts[i] for i in picks])
    samples = []
    for i, ids in zip(picks, encoded, strict=True):
        if len(ids) < 2:
            raise QuantmintError(
                f"{path}: {what[:-1]} {i} tokenizes to {len(ids)} token(s); check the tokenizer"
            )
        samples.append(torch.tensor(ids[-seq_len:], dtype=torch.int64))
    return samples


# ---------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise QuantmintError(f"data file {path} does not exist: check the path (nothing is downloaded)")
    if not path.is_file():
        raise QuantmintError(f"data path {path} is not a file: point at the data file itself")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is dropped
    except UnicodeDecodeError as exc:
        raise QuantmintError(f"{path} is not UTF-8 text ({exc}): convert it to UTF-8") from None
    if not raw.strip():
        raise QuantmintError(
            f"{path} is empty ({'0 bytes' if not raw else 'only whitespace'}): give a file with data"
        )
    return raw


def _load_json(path: Path, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        where = f"{path}, line {exc.lineno} column {exc.colno}"
        if exc.msg == "Extra data":  # one JSON value, then another: JSON Lines under a .json name
            raise QuantmintError(
                f"{where}: a second JSON value after the first, so this is not one JSON document: JSON "
                "Lines (one object per line) are read with kind='boolq' or kind='jsonl' (CLI: --calib-kind "
                "boolq or jsonl) or under a .jsonl name"
            ) from None
        raise QuantmintError(f"{where}: invalid JSON ({exc.msg}): fix or re-export it") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting too deep
        raise QuantmintError(
            f"{path}: JSON this reader refuses ({_json_refusal(exc)}): fix or re-export it"
        ) from None


def _json_refusal(exc: Exception) -> str:
    """Why `json.loads` gave up on a text it could parse (not a syntax error), in a few words."""
    if isinstance(exc, RecursionError):
        return "nested too deep"
    if "integer string conversion" in str(exc):
        return "an integer of thousands of digits"
    return " ".join(str(exc).split(";")[0].split())[:120]


_TYPE_NAMES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "bool",
    int: "number",
    float: "number",
    type(None): "null",
}


def _type_name(value: object) -> str:
    """JSON's name for the type of `value` (`value` may itself be a type)."""
    kind = value if isinstance(value, type) else type(value)
    return _TYPE_NAMES.get(kind, kind.__name__)


def _field(record: dict[str, Any], name: str, expected: type | tuple[type, ...], where: str) -> Any:
    """`record[name]`, checked to be of type `expected`; `where` names the file and position for errors."""
    if name not in record:
        raise QuantmintError(
            f'{where}: missing field "{name}": add it (formats: the quantmint.io.data docstring)'
        )
    value = record[name]
    if not isinstance(value, expected):
        expected = expected if isinstance(expected, tuple) else (expected,)
        names = " or ".join(_type_name(t) for t in expected)
        raise QuantmintError(
            f'{where}: field "{name}" must be of JSON type {names}, got {_type_name(value)} {value!r:.60}'
        )
    return value


def _squad_records(path: Path, top: Any) -> list[dict[str, Any]]:
    """`read_squad`'s records from the parsed JSON `top` of file `path`."""
    if not isinstance(top, dict):
        raise QuantmintError(
            f'{path}: the top level must be a JSON object with a "data" array (SQuAD v1.1), got '
            f"{_type_name(top)} {top!r:.60}"
        )
    articles = _field(top, "data", list, f"{path} (top level)")
    records: list[dict[str, Any]] = []
    for a, article in enumerate(articles):
        at_article = f"{path}, article {a} (data[{a}])"
        _check_object(article, at_article)
        for p, paragraph in enumerate(_field(article, "paragraphs", list, at_article)):
            at_paragraph = f"{path}, article {a} paragraph {p} (data[{a}].paragraphs[{p}])"
            _check_object(paragraph, at_paragraph)
            context = _field(paragraph, "context", str, at_paragraph)
            for q, qa in enumerate(_field(paragraph, "qas", list, at_paragraph)):
                at_question = (
                    f"{path}, article {a} paragraph {p} question {q} (data[{a}].paragraphs[{p}].qas[{q}])"
                )
                _check_object(qa, at_question)
                qid = _field(qa, "id", str, at_question)
                question = _field(qa, "question", str, at_question)
                answers = []
                for n, answer in enumerate(_field(qa, "answers", list, at_question)):
                    at_answer = f"{at_question}, answer {n}"
                    _check_object(answer, at_answer)
                    answers.append(_field(answer, "text", str, at_answer))
                if not answers:
                    raise QuantmintError(
                        f'{at_question}: field "answers" is empty; SQuAD v2.0 unanswerable questions are '
                        "not supported: use a SQuAD v1.1 file or drop those questions"
                    )
                records.append({"id": qid, "context": context, "question": question, "answers": answers})
    if not records:
        raise QuantmintError(f'{path} has no questions ("data" holds none): give a SQuAD v1.1 file with data')
    return records


def _check_object(value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise QuantmintError(f"{where}: must be a JSON object, got {_type_name(value)} {value!r:.60}")


_SUPERGLUE_SEP = " -- "
_LABELS = {"true": True, "false": False}


def _boolq(path: Path, raw: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for obj, where in _jsonl_records(path, raw):
        question = _field(obj, "question", str, where)
        passage = _field(obj, "passage", str, where)
        if "answer" in obj:  # Google's original form
            title = _field(obj, "title", str, where + ' (Google BoolQ form, it has "answer")')
            answer = _field(obj, "answer", bool, where)
        elif "label" in obj:  # SuperGLUE form
            label = _field(obj, "label", (str, bool), where)
            if isinstance(label, str):
                if label.lower() not in _LABELS:
                    raise QuantmintError(f'{where}: field "label" is {label!r}, expected "true" or "false"')
                label = _LABELS[label.lower()]
            answer = label
            if _SUPERGLUE_SEP not in passage:
                raise QuantmintError(
                    f'{where}: field "passage" has no "{_SUPERGLUE_SEP}" between title and text, as the '
                    'SuperGLUE form needs: write "<title> -- <text>", or use Google\'s form with a "title"'
                )
            title, passage = passage.split(_SUPERGLUE_SEP, 1)
        else:
            raise QuantmintError(
                f'{where}: missing field "answer" (Google BoolQ form) or "label" (SuperGLUE form)'
            )
        records.append({"question": question, "title": title, "passage": passage, "answer": answer})
    return records  # not empty: _read_utf8 refused a blank file
