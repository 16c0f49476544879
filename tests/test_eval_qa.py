"""QA and similarity evaluation: SQuAD F1/EM, BoolQ accuracy, Lee correlation, and their pure parts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantmint.errors import QuantmintError
from quantmint.eval.embeddings import sentence_embeddings
from quantmint.eval.qa import (
    _continuation_logprobs,
    boolq_accuracy,
    exact_match,
    f1_score,
    generate_answers,
    normalize_answer,
    squad_f1_em,
)
from quantmint.eval.similarity import (
    average_ranks,
    lee_correlation,
    pearson,
    read_similarity_matrix,
    spearman,
)
from tests.conftest import SHARED_DATA, build_tiny, byte_tokenizer

# ---------------------------------------------------------------- SQuAD scoring (official v1.1 rules)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Denver Broncos!", "denver broncos"),
        ("an apple a day", "apple day"),
        ("Theatre, Anthem and Athena", "theatre anthem and athena"),  # articles only as whole words
        ("Santa Clara, California.", "santa clara california"),
        ("Levi's  Stadium\n", "levis stadium"),  # punctuation is deleted, not turned into a space
        ("A-B", "ab"),
        ("  the  ", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_f1_and_exact_match_by_hand() -> None:
    assert f1_score("Denver Broncos", "Denver Broncos") == 1.0
    # "denver broncos" vs "broncos": P = 1/2, R = 1, F1 = 2 * 1/2 / (3/2) = 2/3
    assert f1_score("Denver Broncos", "the Broncos") == pytest.approx(2 / 3)
    assert exact_match("Denver Broncos", "the Broncos") == 0.0
    assert exact_match("The Broncos.", "broncos") == 1.0
    # repeated tokens count once per match: [cat, cat, sat] vs [cat, sat, on, mat]: P = 2/3, R = 2/4
    assert f1_score("the cat cat sat", "cat sat on a mat") == pytest.approx(4 / 7)
    assert f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: no common token, F1 0


# ---------------------------------------------------------------- correlations


def test_average_ranks_share_ties() -> None:
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks(torch.tensor([1, 1, 1, 2])).tolist() == [2.0, 2.0, 2.0, 4.0]
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]


def test_pearson_by_hand() -> None:
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4]: r = 11 / sqrt(5 * 26)
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0])
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(130))
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.ones(4)))
    with pytest.raises(QuantmintError, match="equally long"):
        pearson(x, y[:3])


def test_spearman_with_ties_by_hand() -> None:
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5)
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))
    # monotone but not linear: Spearman 1, Pearson below 1
    z = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert spearman(z, z.exp()) == pytest.approx(1.0)
    assert pearson(z, z.exp()) < 0.99


# ---------------------------------------------------------------- tiny models and data


def _write_squad(path: Path, questions: list[tuple[str, str, list[str]]]) -> Path:
    qas = [
        {"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": 0} for a in golds]}
        for i, (_, q, golds) in enumerate(questions)
    ]
    paragraphs = [{"context": c, "qas": [qa]} for (c, _, _), qa in zip(questions, qas, strict=True)]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


SQUAD_QUESTIONS = [
    ("Denver beat Carolina.", "Who won?", ["Denver Broncos", "Broncos"]),
    ("The Broncos won 24-10.", "Which team?", ["the Broncos"]),
    ("Carolina lost the game.", "Who lost?", ["Carolina Panthers"]),
]

BOOLQ_ANSWERS = [True, True, False, True, False]


def _write_boolq(path: Path) -> Path:
    lines = []
    for i, answer in enumerate(BOOLQ_ANSWERS):
        if i % 2:  # SuperGLUE form: the title rides in the passage, the label is a string
            record = {"question": f"is it {i}", "passage": f"T{i} -- Fact {i}.", "label": str(answer).lower()}
        else:
            record = {"question": f"is it {i}", "title": f"T{i}", "passage": f"Fact {i}.", "answer": answer}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


class ScriptedLM(nn.Module):
    """A tiny Llama whose next token is scripted: the i-th decoding step emits `script[i]` in every row.

    The real model still runs (so the KV cache is real); only its logits are replaced. `calls` counts
    forward passes, so tests can see when decoding stopped.
    """

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.inner = build_tiny("llama")
        self.config = self.inner.config
        self.script = script
        self.calls = 0
        self.step = 0

    def forward(self, **kwargs: Any) -> Any:
        out = self.inner(**kwargs)
        self.step = 0 if kwargs.get("past_key_values") is None else self.step + 1
        self.calls += 1
        logits = torch.zeros_like(out.logits)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        out.logits = logits
        return out


class BiasedLM(nn.Module):
    """A tiny Llama whose logits favour the tokens of one word by a large margin."""

    def __init__(self, favoured: list[int]) -> None:
        super().__init__()
        self.inner = build_tiny("llama")
        self.config = self.inner.config
        self.favoured = favoured

    def forward(self, **kwargs: Any) -> Any:
        out = self.inner(**kwargs)
        out.logits[..., self.favoured] += 50.0
        return out


@pytest.fixture
def squad_file(tmp_path: Path) -> Path:
    return _write_squad(tmp_path / "squad.json", SQUAD_QUESTIONS)


@pytest.fixture
def boolq_file(tmp_path: Path) -> Path:
    return _write_boolq(tmp_path / "boolq.jsonl")


# ---------------------------------------------------------------- SQuAD with tiny models


def test_squad_structure_and_determinism(squad_file: Path) -> None:
    model, tokenizer = build_tiny("llama"), byte_tokenizer()
    result = squad_f1_em(model, tokenizer, squad_file, n=10, max_new_tokens=8, batch_size=2)
    assert set(result) == {"f1", "em", "n", "seconds"}
    assert result["n"] == 3  # n is capped at the questions the file has
    assert 0.0 <= result["em"] <= result["f1"] <= 100.0
    again = squad_f1_em(model, tokenizer, squad_file, n=10, max_new_tokens=8, batch_size=3)
    assert (again["f1"], again["em"]) == (result["f1"], result["em"])
    assert squad_f1_em(model, tokenizer, squad_file, n=1, max_new_tokens=2)["n"] == 1


def test_generate_answers_batching_is_invisible() -> None:
    """Left padding with mask-derived positions: batched greedy answers equal one-at-a-time answers."""
    model, tokenizer = build_tiny("llama"), byte_tokenizer()
    prompts = ["Hi", "A longer prompt than the first one", "Mid length", "x" * 20]
    batched, cut = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0][0] for p in prompts]
    assert batched == alone
    assert cut == 0
    assert all("\n" not in a for a in batched)


def test_generate_answers_keeps_the_tail_of_long_prompts() -> None:
    model, tokenizer = build_tiny("llama"), byte_tokenizer()  # 128 positions
    answers, cut = generate_answers(model, tokenizer, ["y" * 300, "short"], max_new_tokens=4)
    assert cut == 1 and len(answers) == 2
    with pytest.raises(QuantmintError, match="max_new_tokens"):
        generate_answers(model, tokenizer, ["short"], max_new_tokens=128)


def test_squad_scripted_answers_score_as_computed_by_hand(squad_file: Path) -> None:
    tokenizer = byte_tokenizer()
    model = ScriptedLM(tokenizer("Denver Broncos\nand more text", add_special_tokens=False)["input_ids"])
    result = squad_f1_em(model, tokenizer, squad_file, max_new_tokens=32)
    # every answer is "Denver Broncos": EM 1, then F1 2/3 against "the Broncos", then 0
    assert result["em"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    # decoding stops at the newline (15th token), not at max_new_tokens: one batch, 15 forward passes
    assert model.calls == len("Denver Broncos\n")


def test_generate_answers_stops_at_eos() -> None:
    tokenizer = byte_tokenizer()
    script = tokenizer("Denver", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = ScriptedLM(script + tokenizer("junk", add_special_tokens=False)["input_ids"])
    answers, _ = generate_answers(model, tokenizer, ["Q1", "Question 2"], max_new_tokens=20)
    assert answers == ["Denver", "Denver"]
    assert model.calls == len(script)


def test_squad_rejects_bad_arguments(squad_file: Path, tmp_path: Path) -> None:
    model, tokenizer = build_tiny("llama"), byte_tokenizer()
    with pytest.raises(QuantmintError, match="n must be at least 1"):
        squad_f1_em(model, tokenizer, squad_file, n=0)
    with pytest.raises(QuantmintError, match="does not exist"):
        squad_f1_em(model, tokenizer, tmp_path / "missing.json")


# ---------------------------------------------------------------- BoolQ with tiny models


def test_boolq_structure_and_batch_invariance(boolq_file: Path) -> None:
    model, tokenizer = build_tiny("llama"), byte_tokenizer()
    result = boolq_accuracy(model, tokenizer, boolq_file, batch_size=2)
    assert set(result) == {"accuracy", "majority_baseline", "yes_rate", "n", "seconds"}
    assert result["n"] == len(BOOLQ_ANSWERS)
    assert result["majority_baseline"] == pytest.approx(60.0)
    assert 0.0 <= result["accuracy"] <= 100.0
    alone = boolq_accuracy(model, tokenizer, boolq_file, batch_size=1)
    assert (alone["accuracy"], alone["yes_rate"]) == (result["accuracy"], result["yes_rate"])
    subset = boolq_accuracy(model, tokenizer, boolq_file, n=3)
    assert subset["n"] == 3
    assert subset["majority_baseline"] == pytest.approx(200 / 3)  # True, True, False


@pytest.mark.parametrize(("word", "accuracy", "yes_rate"), [(" yes", 60.0, 100.0), (" no", 40.0, 0.0)])
def test_boolq_model_that_always_says_one_word(
    boolq_file: Path, word: str, accuracy: float, yes_rate: float
) -> None:
    tokenizer = byte_tokenizer()
    model = BiasedLM(tokenizer(word, add_special_tokens=False)["input_ids"])
    result = boolq_accuracy(model, tokenizer, boolq_file, batch_size=2)
    assert result["accuracy"] == pytest.approx(accuracy)  # the fraction of labels equal to `word`
    assert result["yes_rate"] == pytest.approx(yes_rate)


@pytest.mark.parametrize("choices", [[[5], [7]], [[5, 6, 9], [7]]], ids=["one-token", "multi-token"])
def test_continuation_logprobs_match_unpadded_sums(choices: list[list[int]]) -> None:
    model = build_tiny("llama")
    prompts = [[1, 2, 3, 4, 5, 6], [8, 9], [10, 11, 12]]
    scores = _continuation_logprobs(model, prompts, choices, pad=0)
    assert scores.shape == (3, 2)
    for r, prompt in enumerate(prompts):
        for k, choice in enumerate(choices):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + choice])).logits[0].log_softmax(-1)
            expected = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(choice))
            assert float(scores[r, k]) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- Lee correlation


def _write_lee(directory: Path, docs: list[str], ratings: torch.Tensor) -> Path:
    directory.mkdir()
    (directory / "lee.cor").write_bytes("\n".join(docs).encode("latin-1"))
    rows = ["\t".join(f"{v:.8f}" for v in row) for row in ratings.tolist()]
    (directory / "similarities0-1.txt").write_text("\n".join(rows) + "\n")
    return directory


LEE_DOCS = ["A cat sat.", "Caf\xe9 opens late", "Dogs bark at night", "Rain all day", "The cat slept"]


def test_lee_correlation_of_a_tiny_encoder(tmp_path: Path) -> None:
    model, tokenizer = build_tiny("bert"), byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    cosines = sentence_embeddings(model, tokenizer, LEE_DOCS).double()
    cosines = cosines @ cosines.T
    # ratings that are the model's own cosines (and zero below the diagonal, as in the real file)
    lee = _write_lee(tmp_path / "lee", LEE_DOCS, cosines.triu())
    result = lee_correlation(model, tokenizer, lee, batch_size=2)
    assert result["pairs"] == 10 and result["documents"] == 5
    assert result["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert result["spearman"] == pytest.approx(1.0, abs=1e-6)
    # the ratings reversed: both correlations -1
    flipped = _write_lee(tmp_path / "flipped", LEE_DOCS, (-cosines).triu())
    result = lee_correlation(model, tokenizer, flipped)
    assert result["pearson"] == pytest.approx(-1.0, abs=1e-6)
    assert result["spearman"] == pytest.approx(-1.0, abs=1e-6)


def test_lee_errors_name_the_problem(tmp_path: Path) -> None:
    model, tokenizer = build_tiny("bert"), byte_tokenizer()
    with pytest.raises(QuantmintError, match="does not exist"):
        lee_correlation(model, tokenizer, tmp_path / "nowhere")
    lee = _write_lee(tmp_path / "lee", LEE_DOCS, torch.eye(4))
    with pytest.raises(QuantmintError, match="4×4 but .* holds 5 documents"):
        lee_correlation(model, tokenizer, lee)
    (lee / "similarities0-1.txt").write_text("1\t0.5\n0\t1\t0.3\n")
    with pytest.raises(QuantmintError, match="square matrix"):
        read_similarity_matrix(lee / "similarities0-1.txt")
    (lee / "similarities0-1.txt").unlink()
    with pytest.raises(QuantmintError, match="does not exist"):
        lee_correlation(model, tokenizer, lee)


# ---------------------------------------------------------------- real models (slow)


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data folder sits beside the repository)")


@pytest.mark.slow
def test_minilm_lee_correlation() -> None:
    from quantmint.io.models import load_float_model, load_tokenizer
    from quantmint.tools.example_models import example_model_dir

    _need(SHARED_DATA / "lee" / "lee.cor")
    path = example_model_dir("minilm")
    result = lee_correlation(load_float_model(path), load_tokenizer(path), SHARED_DATA / "lee")
    print(f"MiniLM on Lee: pearson {result['pearson']:.4f}, spearman {result['spearman']:.4f}")
    assert result["pairs"] == 1225 and result["documents"] == 50
    assert 0.55 <= result["pearson"] <= 0.9
    assert 0.35 <= result["spearman"] <= 0.9


@pytest.mark.slow
def test_smollm2_squad_first_questions() -> None:
    from quantmint.io.models import load_float_model, load_tokenizer
    from quantmint.tools.example_models import example_model_dir

    _need(SHARED_DATA / "squad" / "dev-v1.1.json")
    path = example_model_dir("smollm2")
    model, tokenizer = load_float_model(path), load_tokenizer(path)
    result = squad_f1_em(model, tokenizer, SHARED_DATA / "squad" / "dev-v1.1.json", n=8)
    print(f"SmolLM2 SQuAD (8 questions): F1 {result['f1']:.2f}, EM {result['em']:.2f}")
    # its answers are whole sentences that contain the gold span: F1 well above 0, EM low
    assert result["n"] == 8
    assert 10.0 <= result["f1"] <= 100.0
