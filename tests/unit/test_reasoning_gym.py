"""reasoning-gym as a prompt source (``data.source=reasoning_gym``, ``python -m nsr_megatron.data.reasoning_gym``) and
a reward (``reward.name=reasoning_gym``), against the real reasoning-gym package (no mocks): generation with default
and non-default task configs, prompt rendering, scoring in both answer formats and in a worker process, the JSONL
round trip, and the checks ``validate`` / ``train`` make (unknown task or setting, equal seeds, held-out questions
that are training questions)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nsr_megatron.config import Config, ConfigError, load_config
from nsr_megatron.data.datasets import ANSWER_TAG_SYSTEM, DataConfig, PromptDataset, ReasoningGymConfig
from nsr_megatron.data.reasoning_gym import decode_payload, encode_payload, generate_rows, task_seed
from nsr_megatron.data.reasoning_gym import main as rg_main
from nsr_megatron.data.tokenizer import build_synthetic_tokenizer
from nsr_megatron.rewards import RewardConfig, RewardScorer
from nsr_megatron.rewards.reasoning_gym import extract_final_answer, reasoning_gym_reward
from tests.helpers import make_tiny_model

CHAIN = "State the final answer to the following arithmetic problem: "
SMALL = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # 10 * 10 * 2 = 200 distinct questions


def _rg_data(**rg: Any) -> DataConfig:
    return DataConfig(source="reasoning_gym", reasoning_gym=ReasoningGymConfig(**{"tasks": ["chain_sum"], **rg}))


def _value(expression: str) -> int:
    """An expression of chain_sum (integers joined by `` + `` / `` - ``), computed here."""
    tokens = expression.split()
    total = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        total += int(number) if op == "+" else -int(number)
    return total


# ------------------------------------------------------------------------------------------------ generation

def test_default_config_items_are_correct_deterministic_and_carry_the_entry() -> None:
    rows = generate_rows({"chain_sum": 1.0}, {}, size=40, seed=3)
    assert rows == generate_rows({"chain_sum": 1.0}, {}, size=40, seed=3)
    assert [r["prompt"] for r in rows] != [r["prompt"] for r in generate_rows({"chain_sum": 1.0}, {}, size=40, seed=4)]
    terms, digits = set(), set()
    for row in rows:
        payload = decode_payload(row["answer"])
        assert payload is not None
        task, config, entry = payload
        assert (task, config, row["task"]) == ("chain_sum", {}, "chain_sum")
        assert entry["question"] == row["prompt"] and row["prompt"].startswith(CHAIN)
        expression = entry["metadata"]["expression"]
        assert row["prompt"] == f"{CHAIN}{expression} =" and entry["answer"] == str(_value(expression))
        terms.add(entry["metadata"]["num_terms"])
        digits.add(entry["metadata"]["num_digits"])
        # tuples survive the JSON payload (some tasks' scoring compares tuples)
        assert entry["metadata"]["difficulty"]["num_terms"] == (2, 6)
    assert terms <= set(range(2, 7)) and len(terms) > 2  # ChainSumConfig's defaults: 2-6 terms, 1-4 digits
    assert digits <= set(range(1, 5)) and len(digits) > 2


def test_non_default_config_bounds_the_items() -> None:
    config = {"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 2}
    rows = generate_rows({"chain_sum": 1.0}, {"chain_sum": config}, size=30, seed=0)
    for row in rows:
        payload = decode_payload(row["answer"])
        assert payload is not None
        _, stored, entry = payload
        assert stored == config
        numbers = entry["metadata"]["expression"].split()[::2]
        assert len(numbers) == 3 and all(len(n) == 2 for n in numbers), entry["metadata"]["expression"]
    # the generator of a task is that task's reasoning-gym dataset at the derived seed
    import reasoning_gym as rg

    direct = rg.create_dataset("chain_sum", size=30, seed=task_seed(0, "chain_sum"), **config)
    assert [r["prompt"] for r in rows] == [direct[i]["question"] for i in range(30)]


def test_mixture_follows_the_weights() -> None:
    rows = generate_rows({"chain_sum": 3.0, "basic_arithmetic": 1.0}, {}, size=400, seed=1)
    counts = Counter(r["task"] for r in rows)
    assert set(counts) == {"chain_sum", "basic_arithmetic"}
    assert 0.65 < counts["chain_sum"] / 400 < 0.85, counts
    none = generate_rows({"chain_sum": 1.0, "basic_arithmetic": 0.0}, {}, size=50, seed=1)
    assert {r["task"] for r in none} == {"chain_sum"}


def test_config_section_checks() -> None:
    with pytest.raises(ValueError, match=r"seed and data.reasoning_gym.eval_seed are both 5"):
        ReasoningGymConfig(tasks=["chain_sum"], seed=5, eval_seed=5)
    with pytest.raises(ValueError, match=r"weights names \['add'\], which is not in"):
        ReasoningGymConfig(tasks=["chain_sum"], weights={"add": 1.0})
    with pytest.raises(ValueError, match=r"configs.chain_sum.seed is set by this section"):
        ReasoningGymConfig(tasks=["chain_sum"], configs={"chain_sum": {"seed": 3}})
    with pytest.raises(ValueError, match=r"needs data.reasoning_gym.tasks"):
        DataConfig(source="reasoning_gym")
    assert ReasoningGymConfig(tasks="chain_sum").tasks == ["chain_sum"]  # type: ignore[arg-type]
    # the nested section loads from YAML-style overrides
    config: Config = load_config(None, ["data.source=reasoning_gym", "data.reasoning_gym.tasks=[chain_sum, leg_counting]",
                                "data.reasoning_gym.weights.chain_sum=2", "data.reasoning_gym.configs.chain_sum.max_terms=3"])
    rg = config.data.reasoning_gym
    assert (rg.task_weights(), rg.configs) == ({"chain_sum": 2.0, "leg_counting": 1.0}, {"chain_sum": {"max_terms": 3}})
    with pytest.raises(ConfigError, match=r"Did you mean data.reasoning_gym.eval_seed"):
        load_config(None, ["data.source=reasoning_gym", "data.reasoning_gym.tasks=[chain_sum]",
                           "data.reasoning_gym.eval_sed=4"])


# ------------------------------------------------------------------------------------------------ prompts

def test_prompts_go_through_the_templates_and_the_chat_template() -> None:
    tok = build_synthetic_tokenizer()  # chat template: <bos> + the messages' contents
    questions = [r["prompt"] for r in generate_rows({"chain_sum": 1.0}, {}, size=6, seed=0)]
    plain = PromptDataset(_rg_data(size=6))
    assert [r.prompt for r in plain.records] == questions  # no tokenizer: a lone user message is its content
    assert plain.source == "reasoning-gym chain_sum (seed 0)"
    chat = PromptDataset(_rg_data(size=6), tok)
    assert [r.prompt for r in chat.records] == ["<bos>" + q for q in questions]
    assert all(len(r.prompt_ids) == len(r.prompt) - len("<bos>") + 1 for r in chat.records)  # one token a char
    tagged = PromptDataset(DataConfig(source="reasoning_gym", template="answer-tag",
                                      reasoning_gym=ReasoningGymConfig(tasks=["chain_sum"], size=6)), tok)
    assert [r.prompt for r in tagged.records] == ["<bos>" + ANSWER_TAG_SYSTEM + q for q in questions]
    assert tagged[0].messages == [{"role": "system", "content": ANSWER_TAG_SYSTEM},
                                  {"role": "user", "content": questions[0]}]
    held_out = PromptDataset(_rg_data(size=6, eval_size=4, eval_seed=9), split="eval")
    assert [r.prompt for r in held_out.records] == [
        r["prompt"] for r in generate_rows({"chain_sum": 1.0}, {}, size=4, seed=9)]


# ------------------------------------------------------------------------------------------------ reward

@pytest.mark.parametrize(("response", "final"), [
    ("Adding up: 3 + 4 = 7.\n<answer> 7 </answer>", "7"),
    ("<answer>5</answer> wait, no.\n<answer>7</answer>\nlast line", "7"),  # the last tag wins over the last line
    ("3 + 4 = 7\n7<|im_end|>", "7"),
    ("3 + 4\n\n  7  \n\n<|endoftext|>", "7"),
    ("<eos>", None),
])
def test_final_answer_extraction(response: str, final: str | None) -> None:
    assert extract_final_answer(response) == final


def test_reward_scores_right_answers_one_and_wrong_ones_zero_in_both_formats() -> None:
    rows = generate_rows({"chain_sum": 1.0}, {}, size=5, seed=2)
    for row in rows:
        payload = decode_payload(row["answer"])
        assert payload is not None
        gold = payload[2]["answer"]
        wrong = str(int(gold) + 1)
        assert reasoning_gym_reward(f"Let me add.\n<answer>{gold}</answer><|im_end|>", row["answer"]) == 1.0
        assert reasoning_gym_reward(f"Let me add.\n{gold}<|im_end|>", row["answer"]) == 1.0
        assert reasoning_gym_reward(f"Let me add.\n<answer>{wrong}</answer>", row["answer"]) == 0.0
        assert reasoning_gym_reward(f"{gold} is close\n{wrong}", row["answer"]) == 0.0
    with pytest.raises(ValueError, match="needs the answer that data.source=reasoning_gym"):
        reasoning_gym_reward("<answer>7</answer>", "7")


def test_payload_round_trip_with_a_task_config() -> None:
    # the task, its config and the whole entry come back from the answer string; the task scores with them
    import reasoning_gym as rg

    ds = rg.create_dataset("basic_arithmetic", size=3, seed=11, min_terms=2, max_terms=2)
    entry = ds[0]
    answer = encode_payload("basic_arithmetic", {"min_terms": 2, "max_terms": 2}, entry)
    assert decode_payload(answer) == ("basic_arithmetic", {"min_terms": 2, "max_terms": 2},
                                      {"question": entry["question"], "answer": entry["answer"],
                                       "metadata": entry["metadata"]})
    assert reasoning_gym_reward(f"<answer>{entry['answer']}</answer>", answer) == 1.0
    assert reasoning_gym_reward("<answer>nonsense</answer>", answer) == 0.0


def test_reward_runs_in_the_scorers_worker_processes() -> None:
    rows = generate_rows({"chain_sum": 1.0}, {}, size=2, seed=7)
    golds = [decode_payload(r["answer"])[2]["answer"] for r in rows]  # type: ignore[index]
    responses = [f"<answer>{golds[0]}</answer>", f"{int(golds[1]) - 3}"]
    config = RewardConfig(name="reasoning_gym", executor="process", num_workers=1, timeout_s=60.0)
    with RewardScorer(config) as scorer:
        rewards, stats = scorer.score_batch(responses, [r["answer"] for r in rows])
    assert rewards == [1.0, 0.0] and stats.failed == 0


# ------------------------------------------------------------------------------------------------ command line

def test_jsonl_command_round_trip_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "chain.jsonl"
    config = {"min_terms": 2, "max_terms": 3, "min_digits": 2, "max_digits": 2}
    assert rg_main(["--task", "chain_sum", "--size", "12", "--seed", "5", "--config", json.dumps(config),
                    "--out", str(out)]) == 0
    assert "wrote 12 chain_sum items (seed 5)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_rows({"chain_sum": 1.0}, {"chain_sum": config}, size=12, seed=5)  # == the data source
    ds = PromptDataset(DataConfig(path=str(out)))  # the JSONL source, default keys
    assert len(ds) == 12
    responses, answers, expected = [], [], []
    for record in ds.records:
        payload = decode_payload(record.answer)
        assert payload is not None and payload[1] == config
        value = _value(payload[2]["metadata"]["expression"])
        responses += [f"<answer>{value}</answer>", f"so\n{value + 1}"]  # (+1 never contains the gold digits: no partial credit)
        answers += [record.answer, record.answer]
        expected += [1.0, 0.0]
    with RewardScorer(RewardConfig(name="reasoning_gym", executor="thread")) as scorer:
        rewards, stats = scorer.score_batch(responses, answers)
    assert rewards == expected and stats.failed == 0


def test_command_line_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.jsonl")
    assert rg_main(["--task", "chain_summ", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task: 'chain_summ' is not a reasoning-gym task" in err and "'chain_sum'" in err
    assert rg_main(["--task", "chain_sum", "--config", '{"max_term": 3}', "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'max_term' is not a setting of reasoning-gym's ChainSumConfig" in err
    assert not Path(out).exists()
    assert rg_main(["--list"]) == 0
    names = capsys.readouterr().out.split()
    assert "chain_sum" in names and "basic_arithmetic" in names and "composite" not in names


# ------------------------------------------------------------------------------------------------ validate / train

@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with room for reasoning-gym questions (the synthetic tokenizer spends a token per char)."""
    return make_tiny_model(tmp_path_factory.mktemp("m") / "hf", max_position_embeddings=512)


def _args(model: Path, run: Path, *extra: str) -> list[str]:
    return [f"model.hf_path={model}", "data.source=reasoning_gym", "data.reasoning_gym.tasks=[chain_sum]",
            "reward.name=reasoning_gym", "reward.executor=thread", f"run.run_dir={run}",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", *extra]


def _error(capsys: pytest.CaptureFixture[str], *args: str, commands: tuple[str, ...] = ("validate",)) -> str:
    """The one-line config error of each command (the same for all)."""
    from nsr_megatron.cli import main

    messages = []
    for command in commands:
        code = main([command, *args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("nsr-megatron: config error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (command, code, err)
        messages.append(lines[0])
    assert len(set(messages)) == 1, messages
    return messages[0]


def test_validate_names_an_unknown_task_and_an_unknown_setting(long_model: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    msg = _error(capsys, *_args(long_model, run, "data.reasoning_gym.tasks=[chain_sun]"))
    assert "data.reasoning_gym.tasks: 'chain_sun' is not a reasoning-gym task (close matches: ['chain_sum'" in msg
    msg = _error(capsys, *_args(long_model, run, "data.reasoning_gym.configs.chain_sum.max_term=3"))
    assert "data.reasoning_gym.configs.chain_sum: 'max_term' is not a setting of reasoning-gym's ChainSumConfig " \
           "(did you mean 'max_terms'?" in msg
    msg = _error(capsys, *_args(long_model, run, "data.reasoning_gym.configs.chain_sum.max_terms=1"))
    assert "ChainSumConfig refuses it (AssertionError: max_terms must be >= min_terms)" in msg
    msg = _error(capsys, *_args(long_model, run, "data.reasoning_gym.eval_seed=0"))
    assert "data.reasoning_gym.seed and data.reasoning_gym.eval_seed are both 0" in msg
    msg = _error(capsys, *_args(long_model, run, "reward.name=math"))
    assert "which reward.name=math cannot score; set reward.name=reasoning_gym" in msg


def test_held_out_questions_that_are_training_questions_are_refused(long_model: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from nsr_megatron.cli import main

    run = tmp_path / "r"
    small = [f"data.reasoning_gym.configs.chain_sum.{k}={v}" for k, v in SMALL.items()]
    sizes = ["data.reasoning_gym.size=300", "data.reasoning_gym.eval_size=20"]
    train_q = [r["prompt"] for r in generate_rows({"chain_sum": 1.0}, {"chain_sum": SMALL}, size=300, seed=0)]
    held_q = [r["prompt"] for r in generate_rows({"chain_sum": 1.0}, {"chain_sum": SMALL}, size=20, seed=1)]
    shared = [q for q in held_q if q in set(train_q)]
    assert shared  # 300 draws from 200 questions: the held-out set overlaps

    # both validate and train refuse, naming the count and the first shared question
    msg = _error(capsys, *_args(long_model, run, *small, *sizes), commands=("train", "validate"))
    assert f"{len(shared)} of the 20 questions of the held-out set (data.reasoning_gym.eval_seed=1, eval_size=20)" \
           f" also occur in the training set, reasoning-gym chain_sum (seed 0); the first: {shared[0]!r}" in msg
    # also when the run evaluates on it
    msg = _error(capsys, *_args(long_model, run, *small, *sizes, "eval.interval=2", "eval.data=reasoning_gym"))
    assert f"{len(shared)} of the 20 questions of eval.data=reasoning_gym" in msg
    # a held-out JSONL file: made with the training seed, every question is a training question
    held_out = tmp_path / "held_out.jsonl"
    assert rg_main(["--task", "chain_sum", "--size", "20", "--seed", "0", "--config", json.dumps(SMALL),
                    "--out", str(held_out)]) == 0
    msg = _error(capsys, *_args(long_model, run, *small, *sizes, "eval.interval=2", f"eval.data={held_out}"))
    assert re.search(rf"20 of the 20 questions of eval.data={re.escape(str(held_out))} also occur", msg), msg

    # wider questions (2-digit terms): no overlap, the run is accepted
    capsys.readouterr()
    assert main(["validate", *_args(long_model, run, "data.reasoning_gym.configs.chain_sum.min_digits=2",
                                    "eval.interval=2", "eval.data=reasoning_gym")]) == 0
    assert "config OK" in capsys.readouterr().out
