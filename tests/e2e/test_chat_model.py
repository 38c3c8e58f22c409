"""A new user's own model and data: a Qwen-style chat model (BPE tokenizer, chat template, turns that end in
``<|im_end|>`` while the tokenizer's EOS is ``<|endoftext|>``) and GSM8K-style JSONL and Parquet prompts.

Rollout must stop at every id of ``generation_config.json``'s ``eos_token_id`` as ``transformers.generate`` does,
not only at the tokenizer's EOS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_model, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many in all?", "72"),
    ("Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of babysitting. How much did she earn?", "10"),
    ("Betty needs $100 for a wallet. She has half of it. Her parents give $15 and her grandparents twice as much. "
     "How much more does she need?", "5"),
    ("James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?", "624"),
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 (dense) with a byte-level BPE tokenizer trained here, Qwen's chat template, and a
    generation_config.json that ends turns at <|im_end|> or <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("chat") / "qwen-style"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [q for q, _ in QUESTIONS] * 20 + ["Please reason step by step, and put your final answer in \\boxed{}."]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    make_tiny_model(path, tokenizer=False, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                    vocab_size=len(tokenizer), max_position_embeddings=256)
    tokenizer.save_pretrained(str(path))
    ids = tokenizer.convert_tokens_to_ids(SPECIAL)
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids[2], ids[0]], "pad_token_id": ids[0]}), encoding="utf-8")
    return path


def test_stop_tokens_come_from_generation_config(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    from nsr_megatron.trainer.preflight import stop_token_ids

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token_id == eot != im_end
    assert stop_token_ids(chat_model, tok, 10_000) == (im_end, eot)


def test_rollout_stops_at_im_end_like_transformers_generate(chat_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsr_megatron.rollout import EmbeddedEngine, SamplingParams
    from nsr_megatron.trainer.preflight import stop_token_ids

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(chat_model, tok, len(tok))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q, _ in QUESTIONS]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    engine = EmbeddedEngine(chat_model)
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=stops), n=16, seed=3)
    ended_at_im_end = 0
    for group in groups:
        for g in group:
            inside = [t for t in g.response_ids[:-1] if t in stops]
            assert not inside, f"generation went on past a stop token: {g.response_ids}"
            if g.response_ids[-1] in stops:
                assert g.finish_reason == "stop"
                ended_at_im_end += g.response_ids[-1] == im_end
            else:
                assert g.finish_reason == "length" and len(g.response_ids) == 24
    assert ended_at_im_end > 0, "no response ended at <|im_end|> (it is 1 of ~320 tokens; 64 x 24 draws)"
    # Greedy decoding matches transformers.generate, which stops at generation_config's eos ids.
    model = AutoModelForCausalLM.from_pretrained(str(chat_model))
    for prompt in prompts:
        ours = engine.generate([prompt], SamplingParams(max_new_tokens=24, top_k=1, stop_token_ids=stops))[0][0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        ref_ids = ref.tolist()
        while ref_ids and ref_ids[-1] == tok.pad_token_id and len(ref_ids) > len(ours.response_ids):
            ref_ids.pop()  # generate pads finished rows
        assert ours.response_ids == ref_ids


def test_training_on_gsm8k_style_jsonl_and_parquet(chat_model: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": q, "answer": f"Step by step.\n#### {a}", "extra": {"final": a}} for q, a in QUESTIONS * 4]
    jsonl = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    parquet = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for data in (jsonl, parquet):
        run_dir = tmp_path / f"run-{data.suffix[1:]}"
        proc = subprocess.run(
            [sys.executable, "-m", "nsr_megatron.cli", "train", "--no-progress", f"model.hf_path={chat_model}",
             f"data.path={data}", "data.prompt_key=question", "data.answer_key=extra.final",
             "data.system_prompt=Please reason step by step, and put your final answer in \\boxed{}.",
             "reward.name=tests.e2e.bad_rewards:ends_at_im_end", f"run.run_dir={run_dir}", "run.steps=2", "rollout.prompts_per_step=8",
             "rollout.samples_per_prompt=8", "rollout.max_new_tokens=24", "loss.name=dapo"],
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2
        # Some of the 128 responses end at <|im_end|> (each of its ~320 tokens has about equal odds in a random
        # model), the others run to the limit; none goes on past it (that would score -100).
        assert all(m["reward/mean"] >= 0 for m in metrics) and sum(m["reward/mean"] for m in metrics) > 0
        assert sum(m["response_length/mean"] for m in metrics) / 2 < 24
