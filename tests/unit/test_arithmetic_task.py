"""The arithmetic task's files: worked solutions, disjoint held-out questions, and reasoning-gym's own verifier
scoring the SFT targets 1 and a wrong answer 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsr_megatron.data.arithmetic import make_arithmetic_task, worked_solution
from nsr_megatron.data.reasoning_gym import decode_payload
from nsr_megatron.rewards.reasoning_gym import reasoning_gym_reward


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worked_solution_and_bad_expressions() -> None:
    assert worked_solution("7 + 8 - 9") == "15\n6"
    assert worked_solution("1 - 6") == "-5"
    assert worked_solution("9 - 9 + 0") == "0\n0"
    with pytest.raises(ValueError, match="operator '\\*' is not \\+ or -"):
        worked_solution("2 * 3")
    with pytest.raises(ValueError, match="is not 'a op b"):
        worked_solution("2 +")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_arithmetic_task(tmp_path_factory.mktemp("task"), seed=3)


def test_held_out_questions_never_occur_in_training(files: dict[str, Path]) -> None:
    rows = {name: _read(path) for name, path in files.items()}
    assert len(rows["sft-eval"]) == len(rows["rl-eval"]) == 200
    assert len(rows["sft-train"]) == len(rows["rl-train"]) > 3000
    train = {r["prompt"] for r in rows["rl-train"]}
    held = [r["prompt"] for r in rows["rl-eval"]]
    assert len(set(held)) == 200 and not train & set(held)
    assert [r["prompt"] for r in rows["sft-train"]] == [r["prompt"] for r in rows["rl-train"]]
    # reasoning-gym's own question text, in the payload, is distinct as well
    questions = {decode_payload(r["answer"])[2]["question"] for r in rows["rl-train"]}  # type: ignore[index]
    assert not questions & {decode_payload(r["answer"])[2]["question"] for r in rows["rl-eval"]}  # type: ignore[index]


def test_the_verifier_scores_the_worked_solutions(files: dict[str, Path]) -> None:
    sft, rl = _read(files["sft-eval"]), _read(files["rl-eval"])
    for s, r in zip(sft[:50], rl[:50], strict=True):
        assert s["prompt"] == r["prompt"] and s["prompt"].endswith(" =")
        assert reasoning_gym_reward(s["response"], r["answer"]) == 1.0
        lines = s["response"].split("\n")
        assert lines[-1] == s["answer"]
        wrong = "\n".join([*lines[:-1], str(int(s["answer"]) + 1)])
        assert reasoning_gym_reward(wrong, r["answer"]) == 0.0
        # the answer must be the last line: the right answer followed by another line scores 0
        assert reasoning_gym_reward(s["response"] + "\nno", r["answer"]) == 0.0


def test_the_files_are_a_function_of_the_seed(files: dict[str, Path], tmp_path: Path) -> None:
    again = make_arithmetic_task(tmp_path / "again", seed=3)
    other = make_arithmetic_task(tmp_path / "other", seed=4)
    for name, path in files.items():
        assert again[name].read_bytes() == path.read_bytes()
    assert _read(other["rl-eval"]) != _read(files["rl-eval"])
