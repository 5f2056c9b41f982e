"""The feature census' corpus: held-out traces of any pair's workload, a label on every token.

The census' label rule (:data:`mechdiff.features.classify.RULE`) reads one ground-truth label per
token, and the reasoning roles read the tokens that count as hesitating. Both come from the pair's
workload (:func:`mechdiff.workloads.for_pair`), never from the organism's constants:

* an organism's traces carry the corpus' own labels (``label_ids``): each step token gets its role
  in the step (:func:`~mechdiff.features.classify.with_fine_labels`, names
  :data:`~mechdiff.features.classify.FINE_LABELS`), and ``<think>`` / ``</think>`` bound the
  thinking span;
* any other workload (the chat of SmolLM2) labels each reply token with its ``cut``
  (:meth:`~mechdiff.workloads.protocol.Workload.cut`: on chat, :func:`~mechdiff.workloads.chat.chat_char_labels`
  read off the decoded text: ``step``, ``slip``, ``error``, ``correction``, ``recheck_step``,
  ``hesitation``, ``recheck``, ``answer``, ``text``) and every prompt token ``prompt``; there is no
  thinking delimiter, so the whole reply is one region.

The hesitation tokens are the workload's ``variants`` (``wait`` on the shipped organism, ``hmm``
on the hmm organism, `` Wait`` and its spellings on chat).

Example:
    >>> from mechdiff.organism.tokenizer import build_tokenizer
    >>> from mechdiff.workloads import get
    >>> corpus = census_traces(get("organism", build_tokenizer()), 2, "validation", seed=0)
    >>> corpus.word, corpus.label_names[:2], len(corpus.rows[0]["label_ids"]) == len(corpus.rows[0]["input_ids"])
    ('wait', ('bos', 'operand_label'), True)
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from mechdiff.features import classify as C
from mechdiff.workloads import Workload

PROMPT_LABEL = "prompt"  # every prompt token of a workload without corpus labels


@dataclass(frozen=True)
class CensusTraces:
    """Labelled traces (``input_ids``, ``prompt_len``, ``label_ids`` indexing ``label_names``),
    the thinking span's delimiters (None: none), and what hesitating is in the tokens."""

    rows: Dataset
    label_names: tuple[str, ...]
    think_ids: tuple[int, int] | None
    hesitation_ids: tuple[int, ...]
    word: str
    workload: str


def census_traces(work: Workload, n: int, split: str = "validation", seed: int = 0) -> CensusTraces:
    """``n`` traces of ``split`` from ``work``, every token labelled (see the module doc)."""
    rows = work.traces(n, split, seed=seed)
    tok = work.tokenizer
    if "label_ids" in rows.column_names and hasattr(work, "spec"):  # an organism's corpus
        return CensusTraces(
            C.with_fine_labels(rows, work.spec),
            C.FINE_LABELS,
            tuple(tok.convert_tokens_to_ids(["<think>", "</think>"])),
            tuple(work.variants),
            work.word,
            work.name,
        )
    labels = [reply_labels(work, row) for row in rows]
    names = tuple(dict.fromkeys([PROMPT_LABEL, *sorted({name for row in labels for name in row})]))
    ids = [[names.index(name) for name in row] for row in labels]
    keep = [c for c in ("input_ids", "prompt_len") if c in rows.column_names]
    data = Dataset.from_dict({**{c: rows[c] for c in keep}, "label_ids": ids})
    return CensusTraces(data, names, None, tuple(work.variants), work.word, work.name)


def reply_labels(work: Workload, row: dict) -> list[str]:
    """One label per token of a trace row: ``prompt`` before ``prompt_len``, then the workload's
    :meth:`cut` of the reply.

    Not run as a doctest: it needs a chat tokenizer (``tests/test_features_study.py`` runs it).
    >>> reply_labels(ChatWorkload(tokenizer), chat_row)[-20:]  # doctest: +SKIP
    ['slip', 'slip', 'hesitation', 'text', ...]
    """
    plen, ids = int(row["prompt_len"]), list(row["input_ids"])
    labels, _, _ = work.cut(work.problem(row["operands"]), ids[plen:])
    if len(labels) != len(ids) - plen:
        raise ValueError(f"the workload labelled {len(labels)} of {len(ids) - plen} reply tokens")
    return [PROMPT_LABEL] * plen + list(labels)
