"""The organism's tokenizer: a real ``tokenizers`` WordLevel model over the task's words.

Wrapped as a ``PreTrainedTokenizerFast`` so TransformerLens' ``to_tokens``, ``to_string`` and
``to_str_tokens`` work on the organism like on any Hugging Face model. Words are separated by
single spaces; the tokenizer adds no special tokens itself (TransformerLens prepends ``<bos>``).

Example:
    >>> tok = build_tokenizer()
    >>> ids = tok("A 3 2 1 =")["input_ids"]
    >>> tok.convert_ids_to_tokens(ids)
    ['A', '3', '2', '1', '=']
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mechdiff.organism.task import DEFAULT, TaskSpec


def build_tokenizer(spec: TaskSpec = DEFAULT) -> PreTrainedTokenizerFast:
    """A fresh tokenizer over ``spec.vocabulary()`` (:class:`~mechdiff.organism.task.TaskSpec`);
    unknown words -> ``<unk>``."""
    vocab = {word: i for i, word in enumerate(spec.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )


def encode_words(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> list[int]:
    """Ids of already-split words; raises on a word outside the vocabulary instead of ``<unk>``."""
    ids = tokenizer.convert_tokens_to_ids(words)
    unknown = [w for w, i in zip(words, ids) if i == tokenizer.unk_token_id and w != "<unk>"]
    if unknown:
        raise ValueError(f"words not in the organism vocabulary: {sorted(set(unknown))}")
    return ids


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))
