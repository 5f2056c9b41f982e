"""The LoRA-lens study as a library call (:mod:`mechdiff.studies.lora`) against ``python -m analyses.lora``.

The slow tests run the CLI once and the library once on the same tiny settings (a random tiny
model with the organism's vocabulary as base and target, LoRAs trained for 2 steps) and check that
the library's result is what the CLI writes, file by file.
"""

import json
import re

import pytest
from conftest import make_tiny_hf

from analyses import lora as lora_cli
from mechdiff import cli
from mechdiff.config_checks import ConfigError
from mechdiff.studies.lora import LoraStudyConfig, LoraStudyResult, run

TINY = {  # flag -> config value: the small settings of the end-to-end test
    "ranks": [1, 2],
    "n_problems": 8,
    "n_holdout": 12,
    "n_sae_traces": 40,
    "sae_samples": 4096,
    "steps": 2,
    "n_traces": 32,
}
FIGURES = (
    "behaviour",
    "length_hesitation",
    "gain_by_rank",
    "ablation_layer",
    "ablation_heatmap",
    "monosemanticity",
    "sae_categories",
    "sae_label_distribution",
)
CLI_ONLY = ("out", "pair", "base", "target", "device", "dtype", "threads", "runs")  # settings the library is not told


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("ranks", [1, 0], "every rank must be >= 1"),
        ("ranks", [], "name at least one rank"),
        ("ranks", [1.5], "every rank must be >= 1"),
        ("n_problems", 0, "must be >= 1"),
        ("n_holdout", -3, "must be >= 1"),
        ("n_sae_traces", 2.0, "must be a whole number >= 1"),
        ("sae_samples", 0, "must be >= 1"),
        ("sae_expansion", 0, "must be >= 1"),
        ("top_k", 0, "must be >= 1"),
        ("steps", 0, "must be >= 1"),
        ("n_traces", -1, "must be >= 1"),
        ("sae_k", 0, "must be a number > 0"),
        ("sae_k", float("nan"), "must be a number > 0"),
        ("kl_weight", -0.5, "must be a number >= 0"),
        ("retrain", "yes", "must be True or False"),
    ],
)
def test_config_rejects_bad_fields(field, value, reason):
    with pytest.raises(ConfigError) as err:
        LoraStudyConfig(**{field: value})
    assert err.value.field == field and err.value.reason == reason


def test_config_keeps_ranks_as_a_tuple_and_records_json_settings():
    cfg = LoraStudyConfig(ranks=[2, 1], runs="somewhere")
    assert cfg.ranks == (2, 1)
    assert cfg.settings()["ranks"] == [2, 1] and cfg.settings()["runs"] == "somewhere"
    assert json.loads(json.dumps(cfg.settings())) == cfg.settings()
    assert cfg == LoraStudyConfig(ranks=(2, 1), runs="somewhere")  # a list or a tuple: one config
    with pytest.raises(TypeError):
        LoraStudyConfig(rank=1)  # a misspelt field is refused, not ignored


def test_cli_flags_become_the_config():
    args = lora_cli.build_parser().parse_args(
        ["--ranks", "4", "1", "--n-problems", "3", "--sae-k", "8", "--retrain", "--kl-weight", "0.5"]
    )
    assert lora_cli.config_from_args(args) == LoraStudyConfig(
        ranks=(4, 1), n_problems=3, sae_k=8.0, retrain=True, kl_weight=0.5, runs="runs"
    )
    default = lora_cli.config_from_args(lora_cli.build_parser().parse_args([]))
    assert default == LoraStudyConfig(runs="runs")  # the CLI saves LoRAs it trains under runs/


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--sae-expansion", "0"], "error: --sae-expansion 0: must be >= 1"),
        (["--kl-weight", "-1"], "error: --kl-weight -1.0: must be a number >= 0"),
        (["--sae-k", "0"], "error: --sae-k 0.0: must be a number > 0"),
        (["--ranks", "2", "-1"], "error: --ranks 2 -1: every rank must be >= 1"),
    ],
)
def test_cli_refuses_a_bad_config_in_one_line_before_writing(argv, line, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli.run(lora_cli.main, ["--out", str(out), *argv])
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == line
    assert not out.exists()


@pytest.fixture(scope="module")
def org_dir(tmp_path_factory):
    """A random tiny Qwen2 with the organism's vocabulary (HF folder)."""
    from mechdiff.organism.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("org")
    model = make_tiny_hf(
        vocab_size=26, hidden_size=32, intermediate_size=64, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def from_cli(org_dir, tmp_path_factory):
    """``python -m analyses.lora`` on the tiny settings: ``(its folder, the summary main returned)``."""
    tmp = tmp_path_factory.mktemp("cli")
    argv = ["--base", str(org_dir), "--target", str(org_dir), "--out", str(tmp / "fig"), "--retrain"]
    for name, value in TINY.items():
        argv += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    summary = lora_cli.main([*argv, "--runs", str(tmp / "runs")])
    return tmp / "fig", summary


@pytest.fixture(scope="module")
def from_library(org_dir):
    """The library call on the same settings, the LoRAs trained in memory (``runs=None``)."""
    from mechdiff.models import load_pair

    pair = load_pair("custom", base=str(org_dir), target=str(org_dir))
    return run(pair, LoraStudyConfig(**TINY, retrain=True), progress=False)


def _without_run_details(summary: dict) -> dict:
    """The summary less its wall time and the settings only the CLI records."""
    settings = {k: v for k, v in summary["settings"].items() if k not in CLI_ONLY}
    return {k: v for k, v in summary.items() if k != "seconds"} | {"settings": settings}


@pytest.mark.slow
def test_analysis_end_to_end_small(from_cli):
    """python -m analyses.lora on tiny settings writes every artefact with the summary keys."""
    out, summary = from_cli
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for key in ("gain_recovered", "gain_recovered_by_rank", "sae", "monosemanticity", "ablation_kl_mlp_over_attention"):
        assert key in saved
    assert set(saved["sae"]) >= {"fvu", "l0", "dead_fraction"}
    assert set(saved["monosemanticity"]) == {"lora", "mlp"}
    assert saved["gain_recovered_by_rank"].keys() == {"1", "2"} and summary["sae"]["d_sae"] == 8 * 14
    assert saved["lora_sources"] == {"1": "trained (2 steps)", "2": "trained (2 steps)"}
    assert saved["settings"]["runs"] == str(out.parent / "runs") and saved["settings"]["pair"] == "custom"
    assert (out.parent / "runs" / "lora_r2" / "adapter_model.safetensors").is_file()
    for name in ("index.html", "report.md", "contexts.json", "ablation_heatmap.png", "sae_categories.png"):
        assert (out / name).stat().st_size > 0
    assert "gain_by_rank.html" in (out / "index.html").read_text()
    import plotly

    page = out / "gain_by_rank.html"  # offline: the page loads the one shared local plotly.js
    src = re.search(r'<script [^>]*src="([^"]+)"', page.read_text()).group(1)
    assert (page.parent / src).read_text() == plotly.offline.get_plotlyjs()


@pytest.mark.slow
def test_library_summary_is_what_the_cli_writes(from_cli, from_library):
    out, _ = from_cli
    saved = json.loads((out / "summary.json").read_text())
    assert isinstance(from_library, LoraStudyResult)
    got = from_library.summary()
    assert list(got) == list(saved)  # the same keys, in the same order
    assert _without_run_details(got) == _without_run_details(saved)
    assert got["settings"]["runs"] is None and not set(got["settings"]) & (set(CLI_ONLY) - {"runs"})
    assert got["settings"]["ranks"] == [1, 2] and got["settings"]["n_holdout_tokens"] > 0
    assert json.loads(json.dumps(got)) == got  # JSON types only: summary() is the file's content
    assert from_library.contexts == json.loads((out / "contexts.json").read_text())


@pytest.mark.slow
def test_library_figures_are_the_cli_figures(from_cli, from_library):
    """result.figures() holds the figures the CLI wrote, with the numbers of the summary."""
    out, _ = from_cli
    figs = from_library.figures()
    assert list(figs) == list(FIGURES)
    shown = re.findall(r"src='([^']+)\.html'", (out / "index.html").read_text())
    assert shown == list(FIGURES)
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.html").stat().st_size > 0
    s = from_library.summary()
    gain = figs["gain_by_rank"].data[0]
    assert list(gain.x) == ["r1", "r2"] and list(gain.y) == list(s["gain_recovered_by_rank"].values())
    assert list(figs["ablation_layer"].data[0].y) == list(s["ablation_kl"]["layer"].values())
    heat = figs["ablation_heatmap"].data[0]
    assert len(heat.z) == 7 and len(heat.z[0]) == 2 and list(heat.x) == ["L0", "L1"]
    assert max(max(row) for row in heat.z) == pytest.approx(max(s["ablation_kl"]["adapter"].values()))
    donut = figs["sae_categories"].data[0]  # activation mass per category, in the summary's shares
    mass = dict(zip(donut.labels, donut.values, strict=True))
    shares = {k: v for k, v in s["sae"]["category_mass"].items() if v > 0}
    assert mass.keys() == shares.keys()
    assert {k: v / sum(mass.values()) for k, v in mass.items()} == pytest.approx(shares)


@pytest.mark.slow
def test_library_write_reproduces_the_cli_folder(from_cli, from_library, tmp_path):
    """result.write(out) writes the CLI's files: the same SAE bytes, contexts, figures and report
    (less the wall time, the settings only the CLI records, and plotly's random div ids)."""
    out, _ = from_cli
    mine = from_library.write(tmp_path / "lib")
    names = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())  # noqa: E731
    assert names(mine) == names(out)
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    wall = re.compile(r"wall time \d+ s")
    for name in names(out):
        a, b = (out / name).read_bytes(), (mine / name).read_bytes()
        if name == "summary.json":
            assert _without_run_details(json.loads(a)) == _without_run_details(json.loads(b))
        elif name.endswith((".html", ".md")):
            assert wall.sub("", uuid.sub("", a.decode())) == wall.sub("", uuid.sub("", b.decode())), name
        elif name.endswith(".json"):  # contexts.json, sae/cfg.json (SAELens orders its keys as a set does)
            assert json.loads(a) == json.loads(b), name
        else:  # PNGs, sae/sae_weights.safetensors
            assert a == b, name
    assert from_library.report().startswith("# Rank-1 LoRA lens on the organism")
    assert from_library.headline() in (mine / "report.md").read_text()


def test_given_loras_must_be_the_configured_ranks(org_dir):
    from mechdiff.adapters.lora import LoRAConfig, LoRAModel
    from mechdiff.models import load_pair

    pair = load_pair("custom", base=str(org_dir), target=str(org_dir))
    lora = LoRAModel.from_base(pair.base, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"loras has ranks \[2\], the config names \[1, 2\]"):
        run(pair, LoraStudyConfig(**TINY), loras={2: lora}, progress=False)


@pytest.mark.slow
def test_library_studies_loras_loaded_from_folders(from_cli, org_dir):
    """LoRAs the caller loads (here: the PEFT folders the CLI trained) give the CLI's numbers."""
    from mechdiff.lora import load_lora
    from mechdiff.models import load_pair

    out, _ = from_cli
    pair = load_pair("custom", base=str(org_dir), target=str(org_dir))
    loras = {r: load_lora(out.parent / "runs" / f"lora_r{r}", pair) for r in TINY["ranks"]}
    got = run(pair, LoraStudyConfig(**TINY), loras=loras, progress=False).summary()
    saved = json.loads((out / "summary.json").read_text())
    assert got["lora_sources"] == {"1": "given", "2": "given"} and got["settings"]["retrain"] is False
    drop = lambda s: {k: v for k, v in _without_run_details(s).items() if k not in ("lora_sources", "settings")}  # noqa: E731
    assert drop(got) == drop(saved)


def test_shipped_loras_are_the_organism_pairs_only(org_dir):
    """The shipped organism gets its shipped LoRAs; any other pair gets LoRAs trained on it."""
    from mechdiff.models import load_pair
    from mechdiff.studies.lora import get_loras

    tiny = load_pair("custom", base=str(org_dir), target=str(org_dir))
    loras, sources = get_loras(tiny, LoraStudyConfig(ranks=[1], steps=1, n_traces=8), progress=False)
    assert sources == {1: "trained (1 steps)"} and loras[1].n_layers == 2
    organism = load_pair("organism")
    loras, sources = get_loras(organism, LoraStudyConfig(ranks=[1]), progress=False)
    assert sources == {1: "shipped"} and loras[1].n_layers == organism.n_layers
