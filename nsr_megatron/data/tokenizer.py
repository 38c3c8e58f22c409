"""A tiny character-level tokenizer for the synthetic arithmetic tasks.

The vocabulary is four special tokens (``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``), the digits ``0-9``, the
operators ``+ - *``, ``=`` and the space: 19 symbols. Every character is one token (a ``WordLevel`` model behind a
split-every-character pre-tokenizer), decoding concatenates tokens without separators (``Fuse``), and the chat
template is ``<bos>`` followed by the message contents, so a prompt ``7=`` becomes ``<bos>7=``.

It is saved in the standard Hugging Face layout (``tokenizer.json`` + ``tokenizer_config.json`` +
``chat_template.jinja``) so that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer,
and the rest of the stack (rollout engine, trainer, SGLang) needs no special case for the quickstart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy; import it only when a tokenizer is actually built.
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
SYMBOLS: tuple[str, ...] = tuple("0123456789") + ("+", "-", "*", "=", " ")
# The text variant (``charset="text"``): the synthetic symbols keep their ids, then the rest of printable ASCII and
# the newline, for tasks whose prompts are English (reasoning-gym's questions): 96 symbols, 100 tokens.
TEXT_SYMBOLS: tuple[str, ...] = SYMBOLS + tuple(
    c for c in "".join(chr(i) for i in range(33, 127)) + "\n" if c not in SYMBOLS)
CHARSETS: dict[str, tuple[str, ...]] = {"synthetic": SYMBOLS, "text": TEXT_SYMBOLS}

# Jinja chat template: no role markers (the vocabulary has no letters), just <bos> + contents.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def _charset(charset: str) -> tuple[str, ...]:
    if charset not in CHARSETS:
        raise ValueError(f"charset={charset!r} is not one of {sorted(CHARSETS)}.")
    return CHARSETS[charset]


def synthetic_vocab(charset: str = "synthetic") -> dict[str, int]:
    """Token -> id map: special tokens first (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3)."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + _charset(charset))}


def build_synthetic_tokenizer(charset: str = "synthetic") -> PreTrainedTokenizerBase:
    """Build the character-level tokenizer as a ``transformers`` fast tokenizer (with a chat template).

    Args:
        charset: ``synthetic`` (the 15 symbols of the synthetic tasks) or ``text`` (printable ASCII and the newline,
            the synthetic symbols' ids unchanged).

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set; ``len(tokenizer) == 19`` (``text``: 100).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=synthetic_vocab(charset), unk_token=UNK_TOKEN))
    every_char = "." if charset == "synthetic" else r"[\s\S]"  # text: the newline is a character too
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(every_char), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_synthetic_tokenizer(directory: str | Path, charset: str = "synthetic") -> Path:
    """Build the synthetic tokenizer (of ``charset``) and ``save_pretrained`` it into ``directory`` (created if
    needed).

    Returns:
        The directory, loadable with ``transformers.AutoTokenizer.from_pretrained``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_synthetic_tokenizer(charset).save_pretrained(str(out))
    return out
