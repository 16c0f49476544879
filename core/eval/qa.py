"""Question answering with causal LMs: SQuAD v1.1 F1 / EM (greedy answers) and BoolQ 0-shot accuracy.

The SQuAD scoring functions (`normalize_answer`, `f1_score`, `exact_match`) follow the official v1.1
evaluation script, so figures compare with published ones for the same prompt.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantmint.errors import QuantmintError
from quantmint.eval.perplexity import new_cache

__all__ = [
    "SQUAD_PROMPT",
    "BOOLQ_PROMPT",
    "squad_f1_em",
    "boolq_accuracy",
    "generate_answers",
    "normalize_answer",
    "f1_score",
    "exact_match",
]

# One hand-written example (not from SQuAD) shows the model that an answer is a short span of the passage;
# without it small instruct models answer in whole sentences, and F1 measures their phrasing instead.
SQUAD_PROMPT = (
    "Answer each question with a short phrase copied from its passage.\n\n"
    "Passage: The Amazon River in South America is the largest river by discharge volume of water in the "
    "world. It flows for about 6,400 km from the Andes to the Atlantic Ocean.\n"
    "Question: Where does the Amazon River end?\nAnswer: the Atlantic Ocean\n\n"
    "Passage: {context}\nQuestion: {question}\nAnswer:"
)
BOOLQ_PROMPT = "{passage}\nQuestion: {question}?\nAnswer:"
BOOLQ_CHOICES = (" yes", " no")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------- SQuAD v1.1 scoring (official)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 (0-1) of the normalised answers, as the official SQuAD v1.1 script computes it."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _max_over_gold(metric: Any, prediction: str, gold: Sequence[str]) -> float:
    return max(metric(prediction, answer) for answer in gold)


# ---------------------------------------------------------------- shared helpers


def _position_limit(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt with the tokenizer's own special tokens (a BOS where the model expects one).

    Unlike perplexity windows, a prompt is a document start, so it gets what the tokenizer adds to one.
    """
    return list(tokenizer(text)["input_ids"])


def _keep_tail(ids: list[int], room: int | None) -> tuple[list[int], bool]:
    """Drop tokens from the front so that `room` are left: the question sits at the end of the prompt."""
    if room is None or len(ids) <= room:
        return ids, False
    return ids[len(ids) - room :], True


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _check_count(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise QuantmintError(f"{name} must be at least 1, got {value}")


# ---------------------------------------------------------------- greedy generation


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    desc: str = "generate",
) -> tuple[list[str], int]:
    """Greedy continuations of `prompts`, each cut at its first newline and stripped.

    Prompts are batched by length (longest first) and left-padded; position ids come from the attention
    mask, so a padded row sees the same positions as it would alone. Decoding uses the model's KV cache and
    stops for a row at EOS or once its text holds a newline, and for the batch when every row has stopped.
    Prompts longer than the model's position limit (less `max_new_tokens`) lose tokens from the front.

    Returns (answers in prompt order, number of prompts that were shortened).
    """
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("batch_size", batch_size)
    limit = _position_limit(model)
    room = None if limit is None else limit - max_new_tokens
    if room is not None and room < 1:
        raise QuantmintError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} positions: "
            "lower max_new_tokens"
        )
    encoded = [_keep_tail(_encode(tokenizer, p), room) for p in prompts]
    truncated = sum(cut for _, cut in encoded)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i][0]))
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = _pad_id(tokenizer)
    model.eval()
    answers = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
        rows = order[start : start + batch_size]
        texts = _greedy_batch(model, tokenizer, [encoded[i][0] for i in rows], max_new_tokens, eos, pad)
        for row, text in zip(rows, texts, strict=True):
            answers[row] = text
    return answers, truncated


def _greedy_batch(
    model: nn.Module, tokenizer: Any, ids: list[list[int]], max_new_tokens: int, eos: int | None, pad: int
) -> list[str]:
    """Greedy decoding of one left-padded batch; returns each row's text up to its first newline."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generated: list[list[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    past = new_cache(model)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        next_ids = out.logits[:, -1].float().argmax(-1)
        for r, token in enumerate(next_ids.tolist()):
            if done[r]:
                continue
            if token == eos:
                done[r] = True
                continue
            generated[r].append(token)
            done[r] = "\n" in tokenizer.decode(generated[r], skip_special_tokens=True)
        if all(done):
            break
        input_ids = next_ids[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    texts = (tokenizer.decode(g, skip_special_tokens=True) for g in generated)
    return [t.split("\n", 1)[0].strip() for t in texts]


# ---------------------------------------------------------------- SQuAD


def squad_f1_em(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    n: int = 500,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> dict[str, Any]:
    """SQuAD v1.1 F1 and EM (0-100) of a causal LM's greedy answers to the first `n` questions of `path`.

    Prompt: `SQUAD_PROMPT`, one hand-written example of a short extractive answer, then
    `"Passage: {context}\\nQuestion: {question}\\nAnswer:"`; the answer is the greedy continuation up to its
    first newline (at most `max_new_tokens` tokens). Each question scores the
    maximum F1 / EM over its gold answers, as in the official v1.1 script.

    Returns a dict: `f1`, `em`, `n` (questions scored), `seconds`.
    """
    from quantmint.io.data import read_squad

    _check_count("n", n)
    examples = read_squad(path)[:n]
    if not examples:
        raise QuantmintError(f"{path} holds no SQuAD questions")
    prompts = [SQUAD_PROMPT.format(context=ex["context"], question=ex["question"]) for ex in examples]
    start = time.perf_counter()
    answers, _ = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, desc="squad")
    f1 = sum(_max_over_gold(f1_score, a, ex["answers"]) for a, ex in zip(answers, examples, strict=True))
    em = sum(_max_over_gold(exact_match, a, ex["answers"]) for a, ex in zip(answers, examples, strict=True))
    return {
        "f1": 100.0 * f1 / len(examples),
        "em": 100.0 * em / len(examples),
        "n": len(examples),
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---------------------------------------------------------------- BoolQ


@torch.no_grad()
def _continuation_logprobs(
    model: nn.Module, prompts: list[list[int]], choices: list[list[int]], pad: int
) -> torch.Tensor:
    """Summed log-probabilities of each choice's tokens after each prompt: [len(prompts), len(choices)].

    Rows are right-padded, so default positions are right. When every choice is one token, one forward
    pass over the prompts scores them all; otherwise each choice gets its own pass over prompt + choice.
    """
    single = all(len(c) == 1 for c in choices)
    sequences = [prompts] if single else [[p + c for p in prompts] for c in choices]
    scores = torch.zeros(len(prompts), len(choices), dtype=torch.float64)
    for k, batch in enumerate(sequences):
        width = max(len(s) for s in batch)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        logprobs = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        logprobs = logprobs.log_softmax(-1)
        for r, prompt in enumerate(prompts):
            if single:  # next-token distribution after the prompt, every choice at once
                scores[r] = logprobs[r, len(prompt) - 1, [c[0] for c in choices]].double()
            else:
                where = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(choices[k]))
                scores[r, k] = logprobs[r, where, choices[k]].double().sum()
    return scores


def _boolq_prompt(example: dict[str, Any]) -> str:
    question = example["question"].removesuffix("?")  # BoolQ's questions have none; never add a second
    return BOOLQ_PROMPT.format(passage=example["passage"], question=question)


def boolq_accuracy(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    n: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """BoolQ 0-shot accuracy (%) of a causal LM on the first `n` questions of `path` (all when None).

    Prompt: `BOOLQ_PROMPT` (`"{passage}\\nQuestion: {question}?\\nAnswer:"`, no second "?" when the
    question has one, as in `quantmint.io.data.boolq_prompt`); the model answers yes when the summed
    log-probability of the tokens of `" yes"` after the prompt exceeds that of `" no"`.

    Returns a dict: `accuracy`, `majority_baseline` (% of the subset's more common label), `yes_rate`
    (% of questions answered yes), `n`, `seconds`.
    """
    from quantmint.io.data import read_boolq

    _check_count("n", n)
    _check_count("batch_size", batch_size)
    examples = read_boolq(path)
    examples = examples if n is None else examples[:n]
    if not examples:
        raise QuantmintError(f"{path} holds no BoolQ questions")
    choices = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in BOOLQ_CHOICES]
    if any(not c for c in choices):
        raise QuantmintError(f"the tokenizer turns one of {BOOLQ_CHOICES} into no tokens")
    limit = _position_limit(model)
    room = None if limit is None else limit - max(len(c) for c in choices)
    prompts = [_keep_tail(_encode(tokenizer, _boolq_prompt(ex)), room)[0] for ex in examples]
    pad = _pad_id(tokenizer)
    model.eval()
    start = time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding per batch
    says_yes = [False] * len(prompts)
    for i in tqdm(range(0, len(order), batch_size), desc="boolq", unit="batch", disable=None):
        rows = order[i : i + batch_size]
        scores = _continuation_logprobs(model, [prompts[r] for r in rows], choices, pad)
        for r, yes in zip(rows, (scores[:, 0] > scores[:, 1]).tolist(), strict=True):
            says_yes[r] = yes
    labels = [bool(ex["answer"]) for ex in examples]
    correct = sum(y == label for y, label in zip(says_yes, labels, strict=True))
    true_count = sum(labels)
    return {
        "accuracy": 100.0 * correct / len(examples),
        "majority_baseline": 100.0 * max(true_count, len(labels) - true_count) / len(labels),
        "yes_rate": 100.0 * sum(says_yes) / len(examples),
        "n": len(examples),
        "seconds": round(time.perf_counter() - start, 2),
    }
