"""Prompt datasets (JSONL / Parquet), chat templates, the resumable sampler, synthetic tasks and tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nsr_megatron.data import DataConfig, EpochSampler, PromptDataset, get_key_path, render_prompt
from nsr_megatron.data.synthetic import REPEAT_LENGTH, TASKS, curriculum, generate, generate_mixture, main, write_jsonl
from nsr_megatron.data.tokenizer import build_synthetic_tokenizer, save_synthetic_tokenizer


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_synthetic_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_through_auto_tokenizer(tokenizer_dir: Path, tokenizer: Any) -> None:
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    assert len(tokenizer) == 19
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer.encode("3+4=7", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["3", "+", "4", "=", "7"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == "3+4=7<eos>"
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "3+4=7"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x", add_special_tokens=False)) == ["<unk>"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "7="}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<bos>7="


# ---------------------------------------------------------------------------------------------------- loading


def test_jsonl_plain_prompts_without_tokenizer(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "1+1=", "answer": 2}), "",
                                               json.dumps({"prompt": "2+2=", "answer": "4"})])
    ds = PromptDataset(DataConfig(path=str(path)))
    assert len(ds) == 2 and ds.num_skipped == 0
    assert [(r.uid, r.prompt, r.answer, r.source_line) for r in ds.records] == [
        (0, "1+1=", "2", 1), (1, "2+2=", "4", 3)]


def test_chat_messages_and_nested_answer_with_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    record = {"prompt": [{"role": "user", "content": "7="}], "reward_model": {"ground_truth": "7", "style": "rule"}}
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(record)])
    ds = PromptDataset(DataConfig(path=str(path), answer_key="reward_model.ground_truth"), tokenizer)
    assert ds[0].prompt == "<bos>7=" and ds[0].answer == "7"
    plain = PromptDataset(DataConfig(path=str(path), answer_key="reward_model.ground_truth",
                                     apply_chat_template=False), tokenizer)
    assert plain[0].prompt == "7="


def test_tokenizer_without_template_joins_plain_text_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tok = build_synthetic_tokenizer()
    tok.chat_template = None
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "What is 2+2?", "answer": "4"})])
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(DataConfig(path=str(path), system_prompt="Be brief."), tok)
    assert ds[0].prompt == "system: Be brief.\nuser: What is 2+2?\nassistant:"
    assert "no chat template" in caplog.text


def test_system_prompt_is_not_added_twice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": own, "answer": "1"}),
                                               json.dumps({"prompt": "yo", "answer": "2"})])
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(DataConfig(path=str(path), system_prompt="Default."))
    assert ds[0].messages == own and ds[1].messages[0] == {"role": "system", "content": "Default."}
    assert "system_prompt is ignored for 1 prompts" in caplog.text


def test_render_prompt_plain_join() -> None:
    assert render_prompt([{"role": "user", "content": "hi"}]) == "hi"
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_prompt(two) == "system: s\nuser: u\nassistant:"


def test_parquet_with_struct_answer_and_chat_prompt(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": f"{d}="}], "reward_model": {"ground_truth": str(d)}}
            for d in range(5)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = PromptDataset(DataConfig(path=str(path), answer_key="reward_model.ground_truth", max_samples=3), tokenizer)
    assert [r.prompt for r in ds.records] == ["<bos>0=", "<bos>1=", "<bos>2="]
    assert [r.source_line for r in ds.records] == [1, 2, 3]


def test_parquet_bad_row_names_file_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "1=", "answer": "1"}, {"prompt": None, "answer": "2"}]), path)
    with pytest.raises(ValueError, match=r"bad\.parquet, row 2: prompt is a NoneType"):
        PromptDataset(DataConfig(path=str(path)))


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "1=", "answer": ', "invalid JSON"),
        ('{"prompt": "1="}', "missing field 'answer'"),
        ('{"prompt": 5, "answer": "1"}', "prompt is a int"),
        ('{"prompt": "1=", "answer": [1, 2]}', "answer is a list"),
        ('{"prompt": [{"role": "user"}], "answer": "1"}', "prompt message 0 needs string 'role' and 'content'"),
        ("[1, 2]", "expected a JSON object, got a list"),
    ],
)
def test_malformed_line_names_file_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    good = json.dumps({"prompt": "1=", "answer": "1"})
    path = _write_lines(tmp_path / "prompts.jsonl", [good, good, line])
    with pytest.raises(ValueError) as info:
        PromptDataset(DataConfig(path=str(path)))
    message = str(info.value)
    assert str(path) in message and "line 3" in message and reason in message
    assert "data.skip_invalid=true" in message


def test_nested_key_error_names_missing_component(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "1=", "reward_model": {"style": "rule"}})])
    with pytest.raises(ValueError, match=r"line 1: data.answer_key='reward_model.ground_truth': missing field "
                                         r"'reward_model.ground_truth' \(no key 'ground_truth' in 'reward_model'; "
                                         r"keys: \['style'\]\)"):
        PromptDataset(DataConfig(path=str(path), answer_key="reward_model.ground_truth"))


def test_skip_invalid_counts_and_records_line_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = json.dumps({"prompt": "1=", "answer": "1"})
    path = _write_lines(tmp_path / "d.jsonl", [good, "not json", good, '{"answer": "1"}', good])
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(DataConfig(path=str(path), skip_invalid=True))
    assert len(ds) == 3 and ds.num_skipped == 2 and ds.skipped_lines == [2, 4]
    assert [r.uid for r in ds.records] == [0, 1, 2] and [r.source_line for r in ds.records] == [1, 3, 5]
    assert "skipped 2 invalid lines" in caplog.text


def test_all_invalid_and_missing_file(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", ["{}"])
    with pytest.raises(ValueError, match="no usable records"):
        PromptDataset(DataConfig(path=str(path), skip_invalid=True))
    with pytest.raises(ValueError, match="data.path is empty"):
        PromptDataset(DataConfig())
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(DataConfig(path=str(tmp_path / "nope.jsonl")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "x.csv"}, "cannot infer the format"),
        ({"path": "x.jsonl", "format": "csv"}, "format='csv'"),
        ({"path": "x.jsonl", "answer_key": "a..b"}, "answer_key='a..b'"),
        ({"path": "x.jsonl", "max_samples": 0}, "max_samples=0"),
    ],
)
def test_data_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_explicit_format_and_key_path_lookup() -> None:
    assert DataConfig(path="data.txt", format="jsonl").resolved_format == "jsonl"
    assert get_key_path({"a.b": 1, "a": {"b": 2}}, "a.b") == 1  # a literal dotted key wins
    assert get_key_path({"a": {"b": {"c": 3}}}, "a.b.c") == 3


# ---------------------------------------------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations_and_batch_at_matches_iteration() -> None:
    sampler = EpochSampler(num_items=10, batch_size=3, seed=7)
    batches = [sampler.next_batch() for _ in range(9)]  # 3 batches per epoch, one item dropped per epoch
    assert batches == [EpochSampler(num_items=10, batch_size=3, seed=7).batch_at(s) for s in range(9)]
    for epoch in range(3):
        items = [i for batch in batches[3 * epoch:3 * epoch + 3] for i in batch]
        assert len(set(items)) == 9 and set(items) <= set(range(10))
    assert sampler.epoch_order(0) != sampler.epoch_order(1)
    other_seed = EpochSampler(num_items=10, batch_size=3, seed=8)
    assert [other_seed.batch_at(s) for s in range(3)] != batches[:3]
    assert EpochSampler(num_items=4, batch_size=2, shuffle=False).batch_at(3) == [2, 3]


def test_sampler_resume_reproduces_order() -> None:
    reference = EpochSampler(num_items=11, batch_size=4, seed=3)
    expected = [reference.next_batch() for _ in range(12)]
    first = EpochSampler(num_items=11, batch_size=4, seed=3)
    seen = [first.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert set(state) == {"epoch", "position", "seed"}
    resumed = EpochSampler(num_items=11, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    assert seen + [resumed.next_batch() for _ in range(7)] == expected


def test_sampler_validation() -> None:
    with pytest.raises(ValueError, match=r"rollout.prompts_per_step=5 must be in \[1, 4\]"):
        EpochSampler(num_items=4, batch_size=5)
    sampler = EpochSampler(num_items=4, batch_size=2)
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        sampler.load_state_dict({"epoch": 0, "position": 9, "seed": 0})


# ---------------------------------------------------------------------------------------------------- synthetic


def _solve(prompt: str) -> str:
    if prompt.endswith("*="):  # repeat: the digit, REPEAT_LENGTH times
        return prompt[0] * REPEAT_LENGTH
    expr = prompt.rstrip("=")
    return str(eval(expr) % 10)  # prompts are only digits and '+'


@pytest.mark.parametrize("task", list(TASKS))
def test_synthetic_tasks_are_correct_and_deterministic(task: str) -> None:
    records = generate(task, 200, seed=1)
    assert records == generate(task, 200, seed=1) and records != generate(task, 200, seed=2)
    assert all(r["task"] == task and r["answer"] == _solve(r["prompt"]) for r in records)
    assert len({r["answer"] for r in records}) == 10


def test_synthetic_prompt_formats() -> None:
    assert generate("echo", 1, seed=0)[0]["prompt"][1:] == "="
    assert generate("successor", 1, seed=0)[0]["prompt"][1:] == "+1="
    record = generate("repeat", 1, seed=0)[0]
    assert record["prompt"][1:] == "*=" and len(record["answer"]) == REPEAT_LENGTH == 12


def test_curriculum_mix_and_validation() -> None:
    records = curriculum(2000, seed=0, hard_fraction=0.25)
    hard = sum(r["task"] == "add" for r in records) / len(records)
    assert 0.2 < hard < 0.3 and {r["task"] for r in records} == {"echo", "add"}
    assert all(r["task"] == "echo" for r in curriculum(50, hard_fraction=0.0))
    with pytest.raises(ValueError, match="unknown synthetic task 'mul'"):
        generate_mixture({"mul": 1.0}, 10)
    with pytest.raises(ValueError, match="hard_fraction=1.5"):
        curriculum(10, hard_fraction=1.5)


def test_synthetic_jsonl_loads_as_dataset(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(generate("add", 20, seed=0), tmp_path / "sub" / "add.jsonl")
    ds = PromptDataset(DataConfig(path=str(path)), tokenizer)
    assert len(ds) == 20 and all(r.prompt.startswith("<bos>") and r.prompt.endswith("=") for r in ds.records)
    ids = tokenizer.encode(ds[0].prompt, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids


def test_synthetic_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--task", "curriculum", "--num-samples", "8", "--out", str(tmp_path / "c.jsonl"),
          "--tokenizer-dir", str(tmp_path / "tok")])
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and "wrote 8 records" in capsys.readouterr().out


def test_benchmark_jsonl_with_the_baselines_prompt_templates(tmp_path: Path) -> None:
    """AIME / AMC / MATH-500-style records: problem, answer (a number or a string), other fields ignored."""
    from nsr_megatron.data.datasets import QWEN_MATH_SYSTEM
    from nsr_megatron.rewards import math_reward

    rows = [{"id": "2024-I-1", "problem": "Find $x$ if $2x = 10$.", "answer": 5, "source": "aime24"},
            {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "answer": "\\frac{3}{4}", "level": 2}]
    path = _write_lines(tmp_path / "aime.jsonl", [json.dumps(r) for r in rows])
    qwen = PromptDataset(DataConfig(path=str(path), prompt_key="problem", template="qwen-math"))
    assert [r.answer for r in qwen.records] == ["5", "\\frac{3}{4}"]
    assert qwen[0].messages == [{"role": "system", "content": QWEN_MATH_SYSTEM},
                                {"role": "user", "content": rows[0]["problem"]}]
    assert qwen[0].prompt.endswith("user: Find $x$ if $2x = 10$.\nassistant:")  # no chat template: plain join
    dapo = PromptDataset(DataConfig(path=str(path), prompt_key="problem", template="dapo"))
    assert dapo[1].prompt.startswith("Solve the following math problem step by step.")
    assert rows[1]["problem"] in dapo[1].prompt and 'after "Answer:"' in dapo[1].prompt
    # A response that follows either instruction scores with the math reward.
    assert math_reward("2x = 10, so x = 5.\nAnswer: \\boxed{5}", qwen[0].answer) == 1.0
    with pytest.raises(ValueError, match="is not one of"):
        DataConfig(path=str(path), template="llama")
    chat = _write_lines(tmp_path / "chat.jsonl", [json.dumps({"prompt": [{"role": "user", "content": "x"}],
                                                              "answer": "1"})])
    with pytest.raises(ValueError, match="wraps a string prompt"):
        PromptDataset(DataConfig(path=str(chat), template="dapo"))
