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

# Jinja chat template: no role markers (the vocabulary has no letters), just <bos> + contents.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def synthetic_vocab() -> dict[str, int]:
    """Token -> id map: special tokens first (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3)."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + SYMBOLS)}


def build_synthetic_tokenizer() -> PreTrainedTokenizerBase:
    """Build the character-level tokenizer as a ``transformers`` fast tokenizer (with a chat template).

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set; ``len(tokenizer) == 19``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=synthetic_vocab(), unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
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


def save_synthetic_tokenizer(directory: str | Path) -> Path:
    """Build the synthetic tokenizer and ``save_pretrained`` it into ``directory`` (created if needed).

    Returns:
        The directory, loadable with ``transformers.AutoTokenizer.from_pretrained``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    build_synthetic_tokenizer().save_pretrained(str(out))
    return out
