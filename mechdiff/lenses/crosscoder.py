"""A BatchTopK crosscoder on base and target residual activations at one site, with Latent Scaling.

One sparse dictionary reads both models at the same token: the encoder takes the concatenated
(normalised) residuals ``[x_base, x_target]``, each latent ``j`` has a decoder direction per model
(``W_dec[j, 0]`` base, ``W_dec[j, 1]`` target). Sparsity is BatchTopK (Minder et al. 2025, arXiv
2504.02922): per batch the ``k * batch`` largest values of ``relu(pre) * (|d_j^base| + |d_j^target|)``
are kept, so no L1 penalty shrinks a weakly used decoder to zero; at inference a latent is active
when that value exceeds a threshold estimated during training (so tokens encode independently).
Dead latents get the AuxK loss (the top ``2k`` dead latents reconstruct the residual error).

Reading: ``relative_norm = |d^target| / (|d^base| + |d^target|)``: base-only below 0.1, shared in
[0.4, 0.6], target-only above 0.9. **Latent Scaling** checks the target-only reading: per latent,
the least-squares scalar ``beta_m`` by which its target decoder direction explains model ``m``'s
activation left unexplained by the other latents (:func:`latent_scaling`); ``nu = beta_base /
beta_target`` near 0 says the direction is absent in the base, near 1 that it is there and the
decoder norm misled (complete shrinkage).

Trained on mechdiff's loop (:func:`mechdiff.training.loop.train`); saved in SAELens' folder layout
(``cfg.json`` + ``sae_weights.safetensors``, architecture ``batchtopk_crosscoder``: SAELens 6.54
has no crosscoder class, and the PyPI ``dictionary-learning`` 0.1.0 has none either).

Example:
    >>> x = torch.randn(4096, 2, 16)
    >>> cc = train_crosscoder(x, CrosscoderConfig(d_sae=64, k=4, steps=50, batch_size=256))
    >>> cc.encode(x[:8]).shape, cc.decode(cc.encode(x[:8])).shape
    (torch.Size([8, 64]), torch.Size([8, 2, 16]))
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mechdiff.evaluation import feature_sets
from mechdiff.evaluation import hesitation as H
from mechdiff.lenses import scoring
from mechdiff.lenses.context import LensContext, cached, last_position
from mechdiff.lenses.cost import measure
from mechdiff.lenses.paired import paired_generate
from mechdiff.organism import task
from mechdiff.training.loop import LoopConfig, train

ARCHITECTURE = "batchtopk_crosscoder"
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
MODELS = ("base", "target")


@dataclass
class CrosscoderConfig:
    """Shape and training budget. ``layer``: the residual site (``blocks.{layer}.hook_resid_post``)."""

    d_sae: int = 512
    k: int = 16
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    aux_coefficient: float = 1 / 32
    dead_steps: int = 300  # a latent unused this many steps is dead (for AuxK)
    layer: int = 1
    seed: int = 0


class Crosscoder(nn.Module):
    """``W_enc [2 d, n]``, ``W_dec [n, 2, d]``; inputs are scaled per model by ``scale`` first."""

    def __init__(self, d_model: int, d_sae: int, k: int, scale: Tensor | None = None):
        super().__init__()
        self.d_model, self.d_sae, self.k = d_model, d_sae, k
        dec = torch.randn(d_sae, 2, d_model)
        dec = 0.1 * dec / dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.flatten(1).T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(2, d_model))
        self.register_buffer("scale", torch.ones(2) if scale is None else scale.float())
        self.register_buffer("threshold", torch.zeros(()))

    def decoder_norms(self) -> Float[Tensor, "d_sae 2"]:
        return self.W_dec.norm(dim=-1)

    def pre(self, x: Float[Tensor, "... 2 d_model"]) -> Float[Tensor, "... d_sae"]:
        """ReLU pre-activations of raw (unscaled) activations."""
        xs = x * self.scale[:, None]
        return torch.relu((xs - self.b_dec).flatten(-2) @ self.W_enc + self.b_enc)

    def encode(self, x: Float[Tensor, "... 2 d_model"]) -> Float[Tensor, "... d_sae"]:
        """Inference encoding: a latent is kept where ``pre * decoder norm sum > threshold``."""
        pre = self.pre(x)
        return pre * (pre * self.decoder_norms().sum(-1) > self.threshold)

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... 2 d_model"]:
        """Reconstruction in raw (unscaled) units."""
        return (torch.einsum("...n,nmd->...md", f, self.W_dec) + self.b_dec) / self.scale[:, None]

    def contribution(self, f: Float[Tensor, "... d_sae"], model: int) -> Float[Tensor, "... d_model"]:
        """What the latents ``f`` write into model ``model`` (0 base, 1 target), raw units."""
        return f @ self.W_dec[:, model] / self.scale[model]

    def batch_topk(self, x: Float[Tensor, "batch 2 d_model"]) -> tuple[Tensor, Tensor]:
        """Training encoding: the ``k * batch`` largest norm-weighted values of the batch."""
        pre = self.pre(x)
        score = pre * self.decoder_norms().sum(-1)
        keep = torch.zeros_like(score, dtype=torch.bool).flatten()
        keep[score.flatten().topk(min(self.k * len(x), score.numel())).indices] = True
        keep = keep.view_as(score) & (score > 0)
        return pre * keep, score


def _scales(acts: Tensor) -> Tensor:
    """Per model: the factor making the mean squared norm ``d_model`` (SAELens' expected-average)."""
    return (acts.shape[-1] / acts.pow(2).sum(-1).mean(0)).sqrt()


def train_crosscoder(
    acts: Float[Tensor, "n_tokens 2 d_model"], cfg: CrosscoderConfig | None = None, *, progress: bool = False
) -> Crosscoder:
    """Train on ``acts[:, 0]`` (base) and ``acts[:, 1]`` (target) at the same tokens."""
    cfg = cfg or CrosscoderConfig()
    if acts.ndim != 3 or acts.shape[1] != 2 or len(acts) < cfg.batch_size:
        raise ValueError(f"acts must be [n_tokens >= batch_size={cfg.batch_size}, 2, d_model]; got {tuple(acts.shape)}")
    acts = acts.detach().float()
    torch.manual_seed(cfg.seed)
    cc = Crosscoder(acts.shape[-1], cfg.d_sae, cfg.k, _scales(acts))
    with torch.no_grad():
        cc.b_dec.copy_((acts * cc.scale[:, None]).mean(0))
    gen = torch.Generator().manual_seed(cfg.seed)
    last_used = torch.zeros(cfg.d_sae, dtype=torch.long)
    thresholds: list[float] = []

    def loss_fn(step):
        x = acts[torch.randint(len(acts), (cfg.batch_size,), generator=gen)]
        f, score = cc.batch_topk(x)
        xs = x * cc.scale[:, None]
        recon = torch.einsum("bn,nmd->bmd", f, cc.W_dec) + cc.b_dec
        err = xs - recon
        mse = err.pow(2).sum((-1, -2)).mean()
        used = (f > 0).any(0)
        last_used[used] = step
        with torch.no_grad():
            active = score[f > 0]
            if len(active):
                thresholds.append(float(active.min()))
        dead = (step - last_used) >= cfg.dead_steps
        aux = torch.zeros(())
        if dead.any():
            k_aux = min(2 * cfg.k, int(dead.sum()))
            xs_in = (x * cc.scale[:, None] - cc.b_dec).flatten(-2)
            pre_dead = (xs_in @ cc.W_enc + cc.b_enc).masked_fill(~dead, float("-inf"))  # before the ReLU:
            top = pre_dead.topk(k_aux, dim=-1)  # a latent that never fires still gets a gradient
            f_aux = torch.zeros_like(xs_in[:, :1].expand(-1, cc.d_sae)).scatter(-1, top.indices, top.values)
            aux_recon = torch.einsum("bn,nmd->bmd", f_aux, cc.W_dec)
            aux = (err.detach() - aux_recon).pow(2).sum((-1, -2)).mean() / err.detach().pow(2).sum((-1, -2)).mean()
        fvu = mse.detach() / (xs - xs.mean(0)).pow(2).sum((-1, -2)).mean()
        return mse + cfg.aux_coefficient * aux, {
            "fvu": float(fvu),
            "l0": float((f > 0).sum(-1).float().mean()),
            "dead": float(dead.float().mean()),
        }

    train(
        cc,
        loss_fn,
        LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_frac=0.02, seed=cfg.seed, progress=progress, desc="crosscoder"),
    )
    with torch.no_grad():  # the inference threshold: mean of the per-batch smallest kept value (last half)
        cc.threshold.fill_(sum(thresholds[len(thresholds) // 2 :]) / max(1, len(thresholds) - len(thresholds) // 2))
    cc.config = cfg
    return cc


def relative_norm(cc: Crosscoder) -> Float[Tensor, " d_sae"]:
    """``|d^target| / (|d^base| + |d^target|)`` per latent."""
    n = cc.decoder_norms().detach()
    return n[:, 1] / n.sum(-1).clamp(min=1e-12)


def latent_kinds(rel: Float[Tensor, " d_sae"]) -> list[str]:
    """``base-only`` (< 0.1), ``shared`` (0.4-0.6), ``target-only`` (> 0.9), else ``other``."""
    return [
        "base-only" if r < 0.1 else "target-only" if r > 0.9 else "shared" if 0.4 <= r <= 0.6 else "other"
        for r in rel.tolist()
    ]


@torch.no_grad()
def latent_scaling(
    cc: Crosscoder,
    acts: Float[Tensor, "n_tokens 2 d_model"],
    chunk: int = 4096,
) -> dict[str, Float[Tensor, " d_sae"]]:
    """Latent Scaling: per latent ``j`` and model ``m``, ``beta_m`` minimising
    ``sum_t |y_m(t) - beta f_j(t) d_j|^2`` with ``d_j`` the latent's *target* decoder direction and
    ``y_m = x_m - (reconstruction_m - f_j W_dec[j, m])`` (what the other latents leave of model m,
    scaled units). Returns ``beta_base``, ``beta_target`` and ``nu = beta_base / beta_target``
    (NaN for latents that never fire on ``acts``)."""
    d = cc.W_dec[:, 1]  # [n d]
    d2 = d.pow(2).sum(-1)
    own = torch.stack([(cc.W_dec[:, m] * d).sum(-1) for m in range(2)])  # [2 n]
    num, den = torch.zeros(2, cc.d_sae), torch.zeros(cc.d_sae)
    for start in range(0, len(acts), chunk):
        x = acts[start : start + chunk].float()
        f = cc.encode(x)
        err = x * cc.scale[:, None] - (torch.einsum("bn,nmd->bmd", f, cc.W_dec) + cc.b_dec)
        f2 = f.pow(2).sum(0)
        for m in range(2):
            num[m] += (f * (err[:, m] @ d.T)).sum(0) + f2 * own[m]
        den += f2 * d2
    beta = num / den.clamp(min=1e-12)
    beta[:, den <= 0] = float("nan")
    return {"beta_base": beta[0], "beta_target": beta[1], "nu": beta[0] / beta[1]}


def save_crosscoder(cc: Crosscoder, folder: str | Path, hook_name: str) -> Path:
    """``folder/cfg.json`` + ``folder/sae_weights.safetensors``, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": ARCHITECTURE,
        "d_in": cc.d_model,
        "d_sae": cc.d_sae,
        "k": cc.k,
        "models": list(MODELS),
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "expected_average",
        "metadata": {"hook_name": hook_name, "training": asdict(getattr(cc, "config", CrosscoderConfig()))},
    }
    tensors = {name: t.detach().contiguous().cpu() for name, t in cc.state_dict().items()}
    for name, write in (
        (WEIGHTS_FILE, lambda p: save_file(tensors, p)),
        (CFG_FILE, lambda p: Path(p).write_text(json.dumps(cfg, indent=1))),
    ):
        tmp = folder / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, folder / name)
    return folder


def load_crosscoder(folder: str | Path) -> Crosscoder:
    """A crosscoder saved by :func:`save_crosscoder` (safetensors only)."""
    folder = Path(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    if cfg.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{folder} holds a {cfg.get('architecture')!r}, not a {ARCHITECTURE}")
    cc = Crosscoder(cfg["d_in"], cfg["d_sae"], cfg["k"])
    cc.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    cc.config = CrosscoderConfig(**cfg["metadata"]["training"])
    return cc


# --------------------------------------------------------------------------- the lens on an organism


def site_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def pair_acts(pair, sequences, layer: int, **kwargs) -> Float[Tensor, "n_tokens 2 d_model"]:
    """Base and target residuals at the site on every token but each sequence's first."""
    site = site_name(layer)
    return torch.stack([cached(m, sequences, [site], **kwargs)[site] for m in (pair.base, pair.target)], 1)


def crosscoder_lens(
    ctx: LensContext,
    cfg: CrosscoderConfig,
    *,
    n_traces: int = 1500,
    folder: str | Path | None = None,
    progress: bool = False,
    max_nu: float = 0.5,
) -> scoring.LensResult:
    """Train on the pair's *train* traces, then name hesitation latents: target-specific by Latent
    Scaling (``nu`` on the validation replies below ``max_nu``; the decoder-norm reading is reported
    beside, and with BatchTopK it calls few latents target-only), ranked by how much
    more they fire at the hesitation prompts' last token than at the controls' (times the target
    decoder norm); the set covers ``share`` of that excess (:func:`~mechdiff.evaluation.hesitation.covering_set`)."""
    pair, spec, s = ctx.pair, ctx.spec, ctx.settings
    with measure() as train:
        train_acts = pair_acts(pair, spec.traces(n_traces, "train", s.seed)["input_ids"], cfg.layer)
        cc = train_crosscoder(train_acts, cfg, progress=progress)
        del train_acts
    if folder is not None:
        save_crosscoder(cc, folder, site_name(cfg.layer))
    with measure() as score:
        with torch.no_grad():
            acts = pair_acts(pair, ctx.tokens.sequences, cfg.layer)
            latents = cc.encode(acts)
            rel, scaling = relative_norm(cc), latent_scaling(cc, acts)
            kinds = latent_kinds(rel)
            excess = (
                cc.encode(_last(pair, ctx.hes.tokens, cfg.layer)).mean(0)
                - cc.encode(_last(pair, ctx.ctl.tokens, cfg.layer)).mean(0)
            ) * cc.decoder_norms()[:, 1]
        candidate = scaling["nu"] < max_nu  # NaN (never fires) is not a candidate
        scores = {j: float(excess[j]) for j in candidate.nonzero().flatten().tolist() if excess[j] > 0}
        named = feature_sets.covering_set(scores, s.share) if scores else []
    alive = (latents > 0).any(0).nonzero().flatten().tolist()
    before = spec.evaluate(pair.target, ctx.problems)["hesitations_per_response"]
    need = scoring.ablation_necessity(
        lambda units: _ablated_rate(ctx, cc, units), named, alive, before, s.random_draws, s.seed
    )
    counts = {k: kinds.count(k) for k in ("base-only", "shared", "target-only", "other")}
    nu_target_only = scaling["nu"][torch.tensor([k == "target-only" for k in kinds]) & ~scaling["nu"].isnan()]
    with torch.no_grad():
        fvu = float((acts - cc.decode(latents)).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    return scoring.LensResult(
        "crosscoder",
        [f"X{j}" for j in named],
        latents[:, named],
        necessity=need,
        steering=_steer(ctx, cc, named),
        train=train,
        score=score,
        extra={
            "site": site_name(cfg.layer),
            "d_sae": cc.d_sae,
            "k": cc.k,
            "fvu": fvu,
            "l0": float((latents > 0).sum(1).float().mean()),
            "n_alive": len(alive),
            "latent_kinds": counts,
            "n_target_specific_by_scaling": int(candidate.sum()),
            "target_only_nu_median": float(nu_target_only.median()) if len(nu_target_only) else None,
            "alive_nu_median": float(scaling["nu"][alive].nanmedian()) if alive else None,
            "named": [
                {"latent": j, "relative_norm": float(rel[j]), "nu": float(scaling["nu"][j]), "excess": scores[j]}
                for j in named
            ],
            "selection": f"target-specific by Latent Scaling (nu < {max_nu}), "
            f"covering {s.share:.0%} of the hesitation-minus-control excess",
        },
    )


def _last(pair, prompts, layer):
    site = site_name(layer)
    return torch.stack([last_position(m, prompts, [site])[site] for m in (pair.base, pair.target)], 1)


def _ablated_rate(ctx: LensContext, cc: Crosscoder, units) -> float:
    """Hesitations per response of the target generating with ``units`` removed at the site:
    ``x_target - sum_j f_j d_j^target``, ``f`` read from both models at each token."""
    spec, site = ctx.spec, site_name(cc.config.layer)
    mask = torch.zeros(cc.d_sae)
    mask[list(units)] = 1.0

    def hooks(reader):
        def edit(x, hook):
            f = cc.encode(torch.stack([reader[site], x], -2))
            return x - cc.contribution(f * mask, 1).to(x.dtype)

        return [(site, edit)]

    tok = spec.tokenizer
    rows = paired_generate(
        ctx.pair.target,
        ctx.pair.base,
        ctx.problems["input_ids"],
        spec.max_new_tokens,
        hooks,
        reader_names=[site],
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id or 0,
    )
    return spec.summarize([spec.grade(task.Problem(tuple(r["operands"])), ids) for r, ids in zip(ctx.problems, rows)])[
        "hesitations_per_response"
    ]


def _steer(ctx: LensContext, cc: Crosscoder, units) -> dict:
    """P(hesitation) at the test hesitation prompts: base, base + the named latents' mean
    ``f (d^target - d^base)`` at the last position, and the target."""
    ids, prompts, site = ctx.spec.variants, ctx.hes_test.tokens, site_name(cc.config.layer)
    f = torch.zeros(cc.d_sae)
    if units:
        f[list(units)] = cc.encode(_last(ctx.pair, ctx.hes.tokens, cc.config.layer)).mean(0)[list(units)]
    with torch.no_grad():
        vec = cc.contribution(f, 1) - cc.contribution(f, 0)

    def add(x, hook):
        x = x.clone()
        x[:, -1] += vec.to(x.dtype)
        return x

    p = {
        name: float(H.next_token_probability(m, prompts, ids, fwd_hooks=h).mean())
        for name, m, h in (
            ("before", ctx.pair.base, []),
            ("after", ctx.pair.base, [(site, add)]),
            ("reference", ctx.pair.target, []),
        )
    }
    return {
        **p,
        "gain": scoring.steering_gain(p["before"], p["after"], p["reference"]),
        "how": "base + mean f (d_target - d_base) of the named latents at the last position; reference: target",
    }
