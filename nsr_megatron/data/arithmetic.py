"""The arithmetic task of ``nsr-megatron quickstart --task arithmetic``: reasoning-gym's ``chain_sum`` with worked
solutions, split into disjoint training and held-out sets, as the files the SFT warm start and RL read.

Items: ``chain_sum`` with 2 or 3 one-digit terms joined by ``+`` / ``-`` (:data:`TASK_CONFIG`), e.g. the question
``State the final answer to the following arithmetic problem: 7 + 8 - 9 =`` with answer ``6``. The prompt is the
question's expression, ``7 + 8 - 9 =``: the preamble is the same for every item, and dropping it halves the
sequences a CPU trains on (the reward still scores against reasoning-gym's whole entry). reasoning-gym's
generator repeats questions (there are 4,200 distinct ones), so the task draws a pool of items, keeps each question
once, shuffles them by ``seed`` and cuts the held-out set first: no held-out question is a training question, by
construction (and checked again by the run's preflight).

The SFT target is a short worked solution: the running sum after each operation, one per line, so the last line is
the answer::

    15
    6

Every token of it is a digit, a sign or a line break the model must get right: nothing is copied from the prompt and
there are no tags, so the share of response tokens whose probability RL can move (and clip) is high. RL rewards with
reasoning-gym's own ``score_answer`` on the response's last non-empty line (``reward.name=reasoning_gym``, which
reads the last ``<answer>...</answer>`` when there is one); the answer field of the RL files is the reasoning-gym
payload that reward reads.

Files written into ``out`` (each once, atomically): ``sft-train.jsonl`` / ``sft-eval.jsonl`` (``prompt``,
``response``, ``answer``) and ``rl-train.jsonl`` / ``rl-eval.jsonl`` (``prompt``, ``answer``: the payload).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "TASK", "TASK_CONFIG", "make_arithmetic_task", "worked_solution"]

TASK = "chain_sum"
TASK_CONFIG: dict[str, Any] = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1,
                               "allow_negation": False}
FORMAT = "v2"  # the worked solutions' format: part of the cache folder's name, so files of another format are not reused
POOL = 20_000  # items drawn to find the distinct questions (about 3,900 of the 4,200)


def worked_solution(expression: str) -> str:
    """``"7 + 8 - 9"`` -> ``"15\\n6"``: the running sum after each operation, left to right, one per line."""
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"expression {expression!r} is not 'a op b [op c ...]' with spaces around + and -.")
    total = int(tokens[0])
    lines = []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        if op not in ("+", "-"):
            raise ValueError(f"expression {expression!r}: operator {op!r} is not + or -.")
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{new}")
        total = new
    return "\n".join(lines)


def _write_once(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def make_arithmetic_task(out: str | Path, *, seed: int = 0, eval_size: int = 200) -> dict[str, Path]:
    """Write the task's four files into ``out`` (kept when they exist); returns ``{"sft-train", "sft-eval",
    "rl-train", "rl-eval"}`` -> path. ``seed`` picks the items and the split."""
    from nsr_megatron.data.reasoning_gym import encode_payload, generate_entries

    out = Path(out)
    paths = {name: out / f"{name}.jsonl" for name in ("sft-train", "sft-eval", "rl-train", "rl-eval")}
    if all(p.is_file() for p in paths.values()):
        return paths
    distinct: dict[str, dict[str, Any]] = {}
    for _, entry in generate_entries({TASK: 1.0}, {TASK: TASK_CONFIG}, size=POOL, seed=seed):
        distinct.setdefault(entry["question"], entry)
    questions = sorted(distinct)
    random.Random(f"nsr-megatron-arithmetic:{seed}").shuffle(questions)
    if len(questions) < 2 * eval_size:
        raise ValueError(f"eval_size={eval_size} leaves too few of the {len(questions)} distinct questions to train on.")
    split = {"eval": questions[:eval_size], "train": questions[eval_size:]}
    for part, chosen in split.items():
        sft_rows, rl_rows = [], []
        for question in chosen:
            entry = distinct[question]
            response = worked_solution(entry["metadata"]["expression"])
            if response.splitlines()[-1] != entry["answer"]:
                raise AssertionError(f"worked solution {response!r} disagrees with reasoning-gym's {entry['answer']!r}")
            prompt = f"{entry['metadata']['expression']} ="
            sft_rows.append({"prompt": prompt, "response": response, "answer": entry["answer"]})
            rl_rows.append({"prompt": prompt, "answer": encode_payload(TASK, TASK_CONFIG, entry)})
        _write_once(paths[f"sft-{part}"], sft_rows)
        _write_once(paths[f"rl-{part}"], rl_rows)
    return paths
