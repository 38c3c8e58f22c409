"""Bad input is caught up front, before any process group or model exists, with one line that names the setting,
the value and the fix. ``validate`` and ``train`` run the same checks (``trainer/preflight.py``).

Most cases call the CLI's ``main`` in this process (the checks need no process group); a few go through a real
subprocess to show the user sees no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from nsr_megatron.cli import main
from tests.helpers import echo_rows, make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``train`` and ``validate`` with ``args``; both must refuse with the same single-line message."""
    messages = []
    for command in ("train", "validate"):
        code, err = run_main(capsys, command, *args)
        assert code == 2, f"{command} {args} exited {code}:\n{err}"
        lines = [line for line in err.splitlines() if line.startswith("nsr-megatron: config error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        messages.append(lines[0])
    assert messages[0] == messages[1]
    return messages[0]


def base(model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.hf_path={model}", f"data.path={data}", "reward.name=synthetic", "reward.executor=thread",
            f"run.run_dir={run_dir}", "rollout.prompts_per_step=4", "rollout.max_new_tokens=3", *extra]


def test_a_good_config_validates_and_describes_the_run(model: Path, data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *base(model, data, tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "config OK: qwen3_moe" in out and "40 prompts" in out and "stop tokens [2]" in out


def test_data_problems(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    missing = tmp_path / "nope.jsonl"
    assert f"data.path='{missing}' does not exist" in refused(capsys, *base(model, missing, run))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert "holds no records (the file is empty)" in refused(capsys, *base(model, empty, run))
    no_answer = write_jsonl(tmp_path / "noans.jsonl", [{"prompt": "1="}])
    msg = refused(capsys, *base(model, no_answer, run))
    assert "line 1: data.answer_key='answer': missing field 'answer'" in msg
    msg = refused(capsys, *base(model, data, run, "data.prompt_key=question"))
    assert "data.prompt_key='question': missing field 'question'" in msg and "keys: ['answer', 'prompt']" in msg
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "1=", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    assert f"{bad}, line 2: not UTF-8" in refused(capsys, *base(model, bad, run))
    msg = refused(capsys, *base(model, data, run, "rollout.prompts_per_step=41"))
    assert "rollout.prompts_per_step=41 is larger than the dataset (40 prompts" in msg


def test_prompt_lengths_against_the_model_positions(model: Path, data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "r"
    # The tiny model has 64 positions; a 3-token prompt leaves room for 61 new tokens.
    msg = refused(capsys, *base(model, data, run, "rollout.max_new_tokens=62"))
    assert "plus rollout.max_new_tokens=62 exceeds the model's max_position_embeddings=64" in msg
    assert "lower rollout.max_new_tokens to at most 61." in msg and "line 1: 3 tokens" in msg
    long_prompt = "1+" * 40 + "1="  # 82 tokens: longer than the model's positions
    long_data = write_jsonl(tmp_path / "long.jsonl", [*echo_rows(8), {"prompt": long_prompt, "answer": "1"}])
    msg = refused(capsys, *base(model, long_data, run))
    assert f"the longest prompt ({long_data}, line 9: 83 tokens)" in msg
    assert "skip the 1 longer prompts with data.max_prompt_tokens=61" in msg
    with caplog.at_level(logging.WARNING):  # the fix works: the long prompt is skipped and counted
        assert main(["validate", *base(model, long_data, run, "data.max_prompt_tokens=61")]) == 0
    assert "skipped 1 prompts longer than data.max_prompt_tokens=61 (first: line 9, 83 tokens)" in caplog.text
    assert "8 prompts" in capsys.readouterr().out


def test_model_folder_problems(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "r"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"model.hf_path='{empty}': no config.json found there" in refused(capsys, *base(empty, data, run))
    bare = make_tiny_model(tmp_path / "no-tok", tokenizer=False)
    msg = refused(capsys, *base(bare, data, run))
    assert f"model.hf_path='{bare}' has no tokenizer files" in msg and "model.tokenizer_path" in msg
    assert main(["validate", *base(bare, data, run, f"model.tokenizer_path={model}")]) == 0  # the fix works
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    msg = refused(capsys, *base(llama, data, run))
    assert ("model_type='llama' is not supported; supported architectures: deepseek_v3, glm4_moe, gpt_oss, qwen2, qwen3, qwen3_moe"
            in msg)
    # An index that lists a shard which is not there.
    sharded = tmp_path / "sharded"
    shutil.copytree(model, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(sharded / "model-00001-of-00002.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names[1:]}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    msg = refused(capsys, *base(sharded, data, run))
    assert "shard file model-00002-of-00002.safetensors listed in" in msg and "is missing" in msg


def test_reward_must_import(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = refused(capsys, *base(model, data, tmp_path / "r"), "reward.name=no_such_module_xyz:score")
    assert "reward.name='no_such_module_xyz:score': reward 'no_such_module_xyz:score': cannot import module" in msg


def _fake_checkpoint(root: Path, step: int, arch: dict[str, object]) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "nsr_meta.json").write_text(json.dumps({"step": step, "has_optimizer": True, "arch": arch,
                                                    "meta": {"step": step}}), encoding="utf-8")
    return path


def test_checkpoint_problems(model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nsr_megatron.config import read_hf_config
    from nsr_megatron.convert import hf_to_mcore
    from nsr_megatron.models.hf_config import arch_from_hf

    run = tmp_path / "r"
    gone = tmp_path / "gone"
    msg = refused(capsys, *base(model, data, run, f"checkpoint.load={gone}"))
    assert f"checkpoint.load='{gone}' does not exist" in msg and "checkpoint.resume=auto" in msg
    assert "--resume" not in msg
    # A converted Qwen2 checkpoint loaded into this Qwen3-MoE run.
    qwen2 = make_tiny_model(tmp_path / "qwen2", model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    step = hf_to_mcore(qwen2, tmp_path / "qwen2-mcore", progress=False)
    msg = refused(capsys, *base(model, data, run, f"checkpoint.load={step}"))
    assert "holds another model than model.hf_path" in msg and "model_type 'qwen2' vs 'qwen3_moe'" in msg
    assert main(["validate", *base(qwen2, data, run, f"checkpoint.load={step}")]) == 0  # its own model loads
    # Resuming a run whose newest checkpoint is past run.steps.
    arch = dataclasses.asdict(arch_from_hf(read_hf_config(model)))
    _fake_checkpoint(run / "checkpoints", 12, arch)
    msg = refused(capsys, *base(model, data, run, "checkpoint.resume=auto", "run.steps=5"))
    assert "is at step 12, past run.steps=5; set run.steps above 12" in msg
    # ... and a run folder with checkpoints is never overwritten by a run that does not resume.
    msg = refused(capsys, *base(model, data, run, "run.steps=20"))
    assert "already holds checkpoints (newest: step_00000012); set checkpoint.resume=auto" in msg
    # A checkpoint of another model in the run folder.
    other = tmp_path / "other"
    _fake_checkpoint(other / "checkpoints", 3, {**arch, "hidden_size": 128})
    msg = refused(capsys, *base(model, data, other, "checkpoint.resume=auto", "run.steps=5"))
    assert "hidden_size 128 vs 64" in msg


def test_validate_checks_a_cluster_layout_from_a_workstation(model: Path, data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = base(model, data, tmp_path / "r", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=4")
    assert main(["validate", "--nodes", "2", "--gpus-per-node", "4", *args]) == 0
    assert "on 8 process(es), dp=4" in capsys.readouterr().out
    code, err = run_main(capsys, "validate", "--world-size", "6", *args)
    assert code == 2 and "world size 6" in err and "Traceback" not in err


def test_settings_that_do_nothing_are_named(model: Path, data: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert main(["validate", *base(model, data, tmp_path / "r", "rollout.num_engines=2",
                                       "algorithm.max_sampling_rounds=5", "model.offload_reference=true")]) == 0
    assert "rollout.num_engines is ignored: rollout.backend=embedded" in caplog.text
    assert "algorithm.max_sampling_rounds is ignored: algorithm.dynamic_sampling=false" in caplog.text
    assert "model.offload_reference is ignored: loss.kl_coef=0" in caplog.text


def test_rollout_settings_that_need_a_gpu_or_a_venv_are_refused(model: Path, data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "r"
    msg = refused(capsys, *base(model, data, run, "rollout.backend=sglang", "rollout.sglang.colocate=true"))
    assert "rollout.sglang.colocate=true shares the training GPUs" in msg and "needs CUDA" in msg
    msg = refused(capsys, *base(model, data, run, "rollout.backend=sglang", "algorithm.routing_replay=R3"))
    assert "SGLang returns them only on CUDA" in msg and "rollout.backend=server" in msg
    msg = refused(capsys, *base(model, data, run, "rollout.backend=server", "rollout.weight_sync=tensor"))
    assert "rollout.weight_sync=tensor" in msg and "use rollout.weight_sync=distributed" in msg
    msg = refused(capsys, *base(model, data, run, "rollout.weight_sync=shared_memory"))  # the embedded engine
    assert "needs rollout.backend=server" in msg and "take rollout.weight_sync=distributed" in msg
    msg = refused(capsys, *base(model, data, run, "rollout.backend=server", "rollout.weight_sync=shared_memory",
                                "rollout.urls=[http://10.0.0.7:30000]"))
    assert "not ['http://10.0.0.7:30000']" in msg
    monkeypatch.setenv("WORLD_SIZE", "16")  # two nodes of 8 ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    msg = refused(capsys, *base(model, data, run, "rollout.backend=server", "rollout.weight_sync=shared_memory"))
    assert "16 ranks over several nodes" in msg
    msg = refused(capsys, *base(model, data, run, "rollout.backend=sglang", "rollout.sglang.python=/no/such/python"))
    assert "rollout.sglang.python='/no/such/python', which does not exist" in msg and "setup_sglang.sh" in msg
    code, err = run_main(capsys, "validate", *base(model, data, run, "rollout.engine=http"))
    assert code == 2 and "Choose the engines with rollout.backend" in err


def test_routing_profiler_needs_an_moe_model(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = make_tiny_model(tmp_path / "dense", model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    msg = refused(capsys, *base(dense, data, tmp_path / "r", "profile.routing=counters"))
    assert "profile.routing=counters profiles MoE routers, but model.hf_path holds a dense qwen3 model" in msg


def test_removed_and_misspelled_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, "validate", "run.seq_length=512")
    assert code == 2 and "unknown config key 'run.seq_length'. It is not an RL setting" in err
    assert "batch.seq_length" in err
    code, err = run_main(capsys, "validate", "optimizer.lr_shedule=cosine")
    assert code == 2 and "Did you mean optimizer.lr_schedule?" in err


def test_plot_without_arguments_says_what_to_pass(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_main(capsys, "plot")
    assert code == 2 and "nothing to draw; pass one or more run directories" in err
    code, err = run_main(capsys, "plot", str(tmp_path))
    assert code == 2 and "has no metrics.jsonl" in err


def test_the_user_sees_one_line_and_no_traceback(model: Path, tmp_path: Path) -> None:
    """Through a real process, as a user runs it: a missing prompt file."""
    proc = subprocess.run(
        [sys.executable, "-m", "nsr_megatron.cli", "train", f"model.hf_path={model}",
         f"data.path={tmp_path / 'missing.jsonl'}", f"run.run_dir={tmp_path / 'r'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [f"nsr-megatron: config error: data.path='{tmp_path / 'missing.jsonl'}' does not exist or is "
                     f"not a file; point it at a .jsonl or .parquet file of prompts."]
    assert not (tmp_path / "r").exists()  # nothing was started


def test_in_loop_evaluation_needs_its_data(model: Path, data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    msg = refused(capsys, *base(model, data, tmp_path / "r", "eval.interval=5"))
    assert "eval.interval=5 needs eval.data" in msg
    msg = refused(capsys, *base(model, data, tmp_path / "r", "eval.interval=5", f"eval.data={tmp_path}/none.jsonl"))
    assert "eval.data=" in msg and "none.jsonl' does not exist" in msg


def test_memory_options_that_cannot_act_are_refused(model: Path, data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    message = refused(capsys, *base(model, data, run, "rollout.backend=server", "rollout.offload_train=true"))
    assert "rollout.offload_train=true" in message and "rollout server" in message and "offload_train=auto" in message
    message = refused(capsys, *base(model, data, run, "rollout.backend=sglang", "rollout.offload_train=true"))
    assert "colocate=true" in message
    message = refused(capsys, *base(model, data, run, "rollout.overlap=true", "rollout.offload_train=true"))
    assert "rollout.overlap" in message and "offload_train" in message
    for fraction in ("1.5", "-0.1"):
        message = refused(capsys, *base(model, data, run, f"optimizer.offload_fraction={fraction}"))
        assert f"optimizer.offload_fraction={float(fraction)}" in message and "[0, 1]" in message
    message = refused(capsys, *base(model, data, run, "optimizer.precision_aware=true"))  # no TE, no offload
    assert "optimizer.precision_aware=true" in message and "optimizer.cpu_offload=true" in message
    # the embedded engine releases its memory, and the hybrid optimizer takes the precision-aware path: accepted
    assert main(["validate", *base(model, data, run, "rollout.offload_train=true")]) == 0
    assert main(["validate", *base(model, data, run, "optimizer.precision_aware=true",
                                   "optimizer.cpu_offload=true")]) == 0
