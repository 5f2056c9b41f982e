"""What an attribution graph explains: target specs, resolved into injection rows.

A *target row* is a scalar of the linearized model, ``vector . x[site, pos] + bias``, where ``x``
is the final-normed residual (``site == n_layers``; frozen ``ln_final`` scale) or layer L's MLP
input (``site == L``, for feature targets: ``vector = W_enc[:, i]``, ``bias = b_enc[i]``). The
backward pass injects ``vector`` as the gradient at ``(site, pos)``.

Specs (``pos`` defaults to the last position):

* :class:`TopLogits` (the default): the most likely next tokens up to a cumulative probability;
* :class:`Token`: one token by name or id (``"wait"``), demeaned unembedding row by default;
* :class:`LogitDiff`: ``logit(token) - logit(other)``;
* :class:`Direction`: any ``d_model`` vector applied to the final-normed residual;
* :class:`FeatureTarget`: an adapter feature's pre-activation (its encoder row).

Shorthands for :func:`resolve_targets`: ``None`` -> ``TopLogits()``, a str or int -> ``Token``,
a pair of them -> ``LogitDiff``, a 1-D tensor -> ``Direction``; a list combines specs.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> tokens = torch.tensor([2, 5, 9, 11])
    >>> rows = resolve_targets(adapted, tokens, "w3")
    >>> rows[0].label, rows[0].token_id, rows[0].pos
    ('w3', 7, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechdiff.adapters.transcoder import AdaptedModel


@dataclass(frozen=True)
class TopLogits:
    """The most likely tokens until their probabilities sum to ``cumulative_prob`` (<= ``max_n``)."""

    cumulative_prob: float = 0.95
    max_n: int = 10
    pos: int = -1


@dataclass(frozen=True)
class Token:
    """One token's logit; ``demean`` subtracts the mean unembedding row (circuit-tracer's default)."""

    token: str | int
    pos: int = -1
    demean: bool = True


@dataclass(frozen=True)
class LogitDiff:
    """``logit(token) - logit(other)``."""

    token: str | int
    other: str | int
    pos: int = -1


@dataclass(frozen=True)
class Direction:
    """``vector . ln_final(resid)[pos]`` for any ``d_model`` vector."""

    vector: Tensor
    label: str = "direction"
    pos: int = -1
    weight: float = 1.0


@dataclass(frozen=True)
class FeatureTarget:
    """The pre-activation of adapter feature ``feature`` of ``layer`` at ``pos``."""

    layer: int
    feature: int
    pos: int = -1


@dataclass
class TargetRow:
    """One resolved target: the scalar ``vector . x[site, pos] + bias`` of the linearized model.

    ``weight`` is its share in influence computations (the probability for top logits, else 1);
    ``prob`` its next-token probability where it is a token; ``token_id`` its vocabulary id, or
    ``None`` (exports give such targets virtual ids ``d_vocab + index``).
    """

    label: str
    kind: str
    site: int
    pos: int
    vector: Float[Tensor, " d_model"]
    bias: float = 0.0
    weight: float = 1.0
    prob: float | None = None
    token_id: int | None = None

    def info(self) -> dict:
        """Everything but the vector, JSON-ready."""
        return {k: getattr(self, k) for k in ("label", "kind", "site", "pos", "bias", "weight", "prob", "token_id")}


def resolve_targets(
    adapted: AdaptedModel, tokens: Int[Tensor, " pos"], spec=None, logits: Float[Tensor, "pos vocab"] | None = None
) -> list[TargetRow]:
    """Turn a target spec (see the module docstring) into target rows for this prompt.

    ``logits`` (the true model's, for probabilities) are computed when not given.
    """
    model = adapted.model
    n_pos = int(tokens.shape[-1])
    if logits is None:
        with torch.no_grad():
            logits = model(tokens.reshape(1, -1))[0]
    specs = spec if isinstance(spec, list) else [spec]
    rows: list[TargetRow] = []
    for s in specs:
        rows += _resolve_one(adapted, _normalise(s), n_pos, logits)
    if not rows:
        raise ValueError(f"target spec {spec!r} resolved to no target rows")
    return rows


def token_id(adapted: AdaptedModel, token: str | int) -> int:
    """The vocabulary id of ``token`` (a token string or an id), with a clear error if unknown."""
    d_vocab = adapted.model.cfg.d_vocab
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise TypeError(f"a token is a str or an int id, not {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < d_vocab:
            raise ValueError(f"token id {token} is not in the vocabulary [0, {d_vocab})")
        return token
    tokenizer = adapted.model.tokenizer
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if token not in vocab or vocab[token] >= d_vocab:
        near = sorted(t for t in vocab if token.strip().lower() in t.lower())[:10]
        raise ValueError(f"token {token!r} is not in the vocabulary" + (f"; similar: {near}" if near else ""))
    return vocab[token]


def check_pos(pos: int, n_pos: int) -> int:
    """``pos`` as a non-negative index into a prompt of ``n_pos`` tokens (negatives count back)."""
    if not -n_pos <= int(pos) < n_pos:
        raise IndexError(f"position {pos} is out of range for a prompt of {n_pos} tokens")
    return int(pos) % n_pos


def _normalise(spec):
    if spec is None:
        return TopLogits()
    if isinstance(spec, (str, int)) and not isinstance(spec, bool):
        return Token(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(t, (str, int)) for t in spec):
        return LogitDiff(*spec)
    if isinstance(spec, Tensor):
        return Direction(spec)
    if isinstance(spec, (TopLogits, Token, LogitDiff, Direction, FeatureTarget)):
        return spec
    raise TypeError(
        f"unknown target spec {spec!r}: use None, a token (str/int), a (token, other) "
        "pair, a d_model tensor, or a TopLogits/Token/LogitDiff/Direction/FeatureTarget"
    )


def _resolve_one(adapted: AdaptedModel, spec, n_pos: int, logits: Tensor) -> list[TargetRow]:
    model = adapted.model
    n_layers, W_U, b_U = model.cfg.n_layers, model.W_U.detach(), model.b_U.detach()
    pos = check_pos(spec.pos, n_pos)
    probs = torch.softmax(logits[pos].double(), dim=-1)

    def token_row(t: int, label: str, kind: str, weight: float | None, demean: bool = True):
        vec, bias = W_U[:, t], float(b_U[t])
        if demean:
            vec, bias = vec - W_U.mean(1), bias - float(b_U.mean())
        prob = float(probs[t])
        return TargetRow(label, kind, n_layers, pos, vec.clone(), bias, prob if weight is None else weight, prob, t)

    if isinstance(spec, TopLogits):
        if not 0 < spec.cumulative_prob <= 1 or spec.max_n < 1:
            raise ValueError("TopLogits needs 0 < cumulative_prob <= 1 and max_n >= 1")
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        n = min(
            int(torch.searchsorted(cum, torch.tensor(spec.cumulative_prob, dtype=cum.dtype))) + 1,
            spec.max_n,
            len(order),
        )
        return [token_row(int(t), _token_str(model, int(t)), "top_logit", None) for t in order[:n]]
    if isinstance(spec, Token):
        t = token_id(adapted, spec.token)
        return [token_row(t, _token_str(model, t), "token", 1.0, spec.demean)]
    if isinstance(spec, LogitDiff):
        a, b = token_id(adapted, spec.token), token_id(adapted, spec.other)
        if a == b:
            raise ValueError(f"a logit difference needs two different tokens, got {spec.token!r} twice")
        label = f"{_token_str(model, a)} - {_token_str(model, b)}"
        return [
            TargetRow(
                label,
                "logit_diff",
                n_layers,
                pos,
                (W_U[:, a] - W_U[:, b]).clone(),
                float(b_U[a] - b_U[b]),
                1.0,
                None,
                None,
            )
        ]
    if isinstance(spec, Direction):
        vec = torch.as_tensor(spec.vector).to(W_U.device, W_U.dtype)
        if vec.shape != (model.cfg.d_model,):
            raise ValueError(f"a direction needs shape ({model.cfg.d_model},), got {tuple(vec.shape)}")
        return [TargetRow(spec.label, "direction", n_layers, pos, vec.clone(), 0.0, spec.weight)]
    adapter = _adapter(adapted, spec.layer, spec.feature)
    return [
        TargetRow(
            f"L{spec.layer}F{spec.feature}",
            "feature",
            spec.layer,
            pos,
            adapter.W_enc[:, spec.feature].detach().clone(),
            float(adapter.b_enc.detach()[spec.feature]),
            1.0,
        )
    ]


def _adapter(adapted: AdaptedModel, layer: int, feature: int):
    if not 0 <= layer < len(adapted.adapters):
        raise IndexError(f"layer {layer} is out of range (the model has {len(adapted.adapters)})")
    if not 0 <= feature < adapted.config.d_sae:
        raise IndexError(f"feature {feature} is out of range (d_sae = {adapted.config.d_sae})")
    return adapted.adapters[layer]


def _token_str(model, t: int) -> str:
    tokenizer = model.tokenizer
    return tokenizer.convert_ids_to_tokens(int(t)) if tokenizer is not None else str(int(t))
