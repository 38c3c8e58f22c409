"""Synthetic verifiable tasks for the quickstart and the tests.

Tasks (all symbols are in the tokenizer of ``data/tokenizer.py``):

* ``echo``:      ``7=``   -> ``7``   easy: in a reference run from a random tiny MoE, reward 0.31 -> 0.98
                                    in 100 steps
* ``successor``: ``7+1=`` -> ``8``   the next digit, mod 10
* ``add``:       ``3+9=`` -> ``2``   (a + b) mod 10; hard: the reference run stays at chance (0.09) after 150 steps
* ``repeat``:    ``7*=``  -> ``777777777777``   the digit ``REPEAT_LENGTH`` (12) times: the task where clipping
                                    matters (``configs/repeat.yaml``: 12-token responses, 8 optimizer steps per
                                    rollout batch). The ``synthetic`` reward scores the fraction of the answer's
                                    positions the response gets right, so every position learned earns reward; a
                                    reference run goes 0.04 -> 0.9 in 100 steps while 5-13% of the tokens are
                                    clipped.

Records are ``{"prompt", "answer", "task"}`` and are generated deterministically from a seed. A curriculum is a
mix of tasks with weights (``generate_mixture``), e.g. ``curriculum(n, hard_fraction=0.25)``: 75% ``echo`` and 25%
``add``, so the reward visibly rises while the hard task still has signal. ``write_jsonl`` writes the records in the
format ``PromptDataset`` reads with its default keys; score them with the ``synthetic`` reward.

Command line: ``python -m nsr_megatron.data.synthetic --task echo --num-samples 1000 --out data/echo.jsonl
--tokenizer-dir data/tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

SyntheticRecord = dict[str, str]
TaskFn = Callable[[random.Random], tuple[str, str]]


def _echo(rng: random.Random) -> tuple[str, str]:
    d = rng.randrange(10)
    return f"{d}=", f"{d}"


def _successor(rng: random.Random) -> tuple[str, str]:
    d = rng.randrange(10)
    return f"{d}+1=", f"{(d + 1) % 10}"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"{a}+{b}=", f"{(a + b) % 10}"


REPEAT_LENGTH = 12


def _repeat(rng: random.Random) -> tuple[str, str]:
    d = rng.randrange(10)
    return f"{d}*=", str(d) * REPEAT_LENGTH


# name -> generator of one (prompt, answer) pair; the one-digit tasks easiest first, then the long answer.
TASKS: dict[str, TaskFn] = {"echo": _echo, "successor": _successor, "add": _add, "repeat": _repeat}


def _check_task(task: str) -> TaskFn:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}: choose one of {list(TASKS)}.")
    return TASKS[task]


def generate(task: str, num_samples: int, seed: int = 0) -> list[SyntheticRecord]:
    """``num_samples`` records of one task, a pure function of ``(task, num_samples, seed)``."""
    return generate_mixture({task: 1.0}, num_samples, seed)


def generate_mixture(weights: Mapping[str, float], num_samples: int, seed: int = 0) -> list[SyntheticRecord]:
    """A curriculum: each record's task drawn with probability proportional to ``weights[task]``.

    Args:
        weights: task name -> non-negative weight (at least one positive).
        num_samples: number of records (>= 1).
        seed: the records are a pure function of ``(weights, num_samples, seed)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1.")
    names = list(weights)
    fns = [_check_task(name) for name in names]
    probs = [float(weights[name]) for name in names]
    if any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ValueError(f"task weights {dict(weights)} must be >= 0 with a positive sum.")
    rng = random.Random(f"nsr-megatron-synthetic:{seed}")
    records = []
    for _ in range(num_samples):
        k = rng.choices(range(len(names)), weights=probs)[0] if len(names) > 1 else 0
        prompt, answer = fns[k](rng)
        records.append({"prompt": prompt, "answer": answer, "task": names[k]})
    return records


def curriculum(
    num_samples: int, seed: int = 0, easy: str = "echo", hard: str = "add", hard_fraction: float = 0.5
) -> list[SyntheticRecord]:
    """Mix of an easy and a hard task: a fraction ``hard_fraction`` (in [0, 1]) of the records is ``hard``."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction={hard_fraction} must be in [0, 1].")
    if easy == hard:
        return generate(easy, num_samples, seed)
    return generate_mixture({easy: 1.0 - hard_fraction, hard: hard_fraction}, num_samples, seed)


def write_jsonl(records: Iterable[Mapping[str, object]], path: str | Path) -> Path:
    """Write one JSON object per line (parent directories are created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Write a synthetic data set (and optionally the tokenizer) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--task", default="echo", choices=[*TASKS, "curriculum"])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard-fraction", type=float, default=0.5, help="curriculum only: share of 'add'")
    parser.add_argument("--out", required=True, help="output .jsonl")
    parser.add_argument("--tokenizer-dir", default=None, help="also save the synthetic tokenizer here")
    args = parser.parse_args(argv)
    if args.task == "curriculum":
        records = curriculum(args.num_samples, args.seed, hard_fraction=args.hard_fraction)
    else:
        records = generate(args.task, args.num_samples, args.seed)
    print(f"wrote {len(records)} records to {write_jsonl(records, args.out)}")
    if args.tokenizer_dir:
        from nsr_megatron.data.tokenizer import save_synthetic_tokenizer

        print(f"saved the synthetic tokenizer to {save_synthetic_tokenizer(args.tokenizer_dir)}")


if __name__ == "__main__":
    main()
