"""Local datasets for quantmint's lm-eval task configs (read by `custom_dataset`, no download, no cache).

The folder comes from `$QUANTMINT_DATA_DIR`, which `python -m quantmint.lm_eval` sets from `--data-dir`
(default `../shared/data`); the files are those of shared/data/README.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmint.errors import QuantmintError

if TYPE_CHECKING:  # `datasets` comes with lm-eval; imported where a task loads its data
    import datasets

_WIKITEXT_HEADING = re.compile(r"^= [^=].* =$")


def _data_file(relative: str) -> Path:
    root = os.environ.get("QUANTMINT_DATA_DIR")
    if not root:
        raise QuantmintError(
            "no data folder: pass --data-dir DIR to python -m quantmint.lm_eval (or set QUANTMINT_DATA_DIR)"
        )
    path = Path(root) / relative
    if not path.is_file():
        raise QuantmintError(f"{path} does not exist: --data-dir must hold {relative}")
    return path


def wikitext_documents(text: str) -> list[str]:
    """Split tokenized WikiText into articles, as EleutherAI/wikitext_document_level does.

    An article starts at a top-level heading line (` = Title = `, not ` = = Section = = `); each article
    keeps its lines (newlines included) from its heading to the next one.
    """
    pages: list[list[str]] = []
    for line in text.split("\n"):
        if _WIKITEXT_HEADING.match(line.strip()) or not pages:
            pages.append([])
        pages[-1].append(line)
    return [page for page in ("\n".join(lines) for lines in pages) if page.strip()]


def wikitext2(**_: Any) -> datasets.DatasetDict:
    """wikitext-2 test (`wikitext-2/test.txt`) as documents `{"page": str}` in file order."""
    import datasets

    text = _data_file("wikitext-2/test.txt").read_text(encoding="utf-8")
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([{"page": p} for p in wikitext_documents(text)])}
    )


def boolq(**_: Any) -> datasets.DatasetDict:
    """BoolQ dev in its SuperGLUE form (`boolq/val.jsonl`), `label` as lm-eval's boolq has it (0 no, 1 yes).

    The passage keeps its `"<title> -- "` prefix, as in lm-eval's `super_glue` boolq.
    """
    import datasets

    rows = []
    for line in _data_file("boolq/val.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            label = record["label"]
            label = label if isinstance(label, bool) else str(label).lower() == "true"
            rows.append({"question": record["question"], "passage": record["passage"], "label": int(label)})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def squad(**_: Any) -> datasets.DatasetDict:
    """SQuAD v1.1 dev (`squad/dev-v1.1.json`) as `{"context", "question", "answers": [str]}` in file order."""
    import datasets

    from quantmint.io.data import read_squad

    rows = [
        {"context": q["context"], "question": q["question"], "answers": list(q["answers"])}
        for q in read_squad(_data_file("squad/dev-v1.1.json"))
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def wikitext_detokenizer(doc: dict[str, str]) -> str:
    """lm-eval's own wikitext detokenizer (tasks/wikitext/preprocess_wikitext.py)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as detokenize

    return detokenize(doc)


def wikitext_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval's own wikitext metrics: words and bytes counted in the document before detokenizing."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)


def squad_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (%) of the generated answer, the maximum over the gold answers."""
    from quantmint.eval.qa import exact_match, f1_score

    answer = results[0].strip().split("\n")[0]
    return {
        "exact_match": 100.0 * max(exact_match(answer, g) for g in doc["answers"]),
        "f1": 100.0 * max(f1_score(answer, g) for g in doc["answers"]),
    }
