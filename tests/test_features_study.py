"""The feature census as a library call (:mod:`mechdiff.studies.features`) on any pair's workload:
the shipped organism (the library's result is what the script writes), the hmm organism (its
hesitation word is "hmm", not "wait") and the tiny chat stand-in for SmolLM2 of
:mod:`test_hesitation_chat` (a byte-level BPE learnt on chat traces, tiny random Llamas in a
temporary ``$MECHDIFF_CACHE``).
"""

import json
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from test_hesitation_chat import adapters, pair, tokenizer  # noqa: F401  (the chat stand-in's fixtures)

from analyses import features as script
from mechdiff.features import classify as C
from mechdiff.models import load_pair
from mechdiff.organism import task
from mechdiff.real import chat
from mechdiff.studies import features as study
from mechdiff.studies.features_labels import PROMPT_LABEL, census_traces
from mechdiff.workloads import ChatWorkload, for_pair

SHIPPED_SUMMARY = "figures/features/summary.json"  # written by python -m analyses.features (the organism)
SMALL = ["--n-traces", "16", "--batch-size", "8", "--top-k", "6", "--pages-per-category", "1"]
SMALL += ["--max-reasoning-pages", "2"]
RUN_DEPENDENT = {"seconds", "figures"}  # wall time, and paths under the folder written


def _comparable(summary: dict) -> dict:
    out = {k: v for k, v in summary.items() if k not in RUN_DEPENDENT}
    out["store"] = {k: v for k, v in summary["store"].items() if k not in ("seconds", "tokens_per_second")}
    return json.loads(json.dumps(out))


def _shipped_keys() -> set[str]:
    return set(json.loads((Path(__file__).parents[1] / SHIPPED_SUMMARY).read_text()))


# --------------------------------------------------------------------------- the organisms


def test_the_library_call_is_what_the_script_writes(tmp_path):
    """The shipped organism with random adapters: ``run`` then ``write`` gives the summary, files and
    figures the CLI writes, with every key of the shipped summary.json."""
    out = tmp_path / "cli"
    written = script.main(["--adapters", "random:32", "--out", str(out), "--store", str(tmp_path / "s1"), *SMALL])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(written))
    assert set(written) >= _shipped_keys() and written["pair"] == "organism"

    torch.manual_seed(0)  # as the script seeds before loading the pair: the control draws the same adapters
    org_pair = load_pair("organism")
    adapted = script.load_adapters(org_pair, "random:32", seed=0)
    cfg = study.FeaturesConfig(
        n_traces=16, batch_size=8, top_k=6, pages_per_category=1, max_reasoning_pages=2, store=str(tmp_path / "s2")
    )
    result = study.run(org_pair, adapted, cfg, progress=False, pair_name="organism", adapters_name="random:32")
    lib = result.summary()
    expected = _comparable(written)
    expected["store"]["folder"] = cfg.store
    assert _comparable(lib) == expected
    assert lib["figures"] == ["category_counts.html", "category_counts.png", "regions.html", "regions.png"]
    figures = result.figures()
    assert set(figures) == {"category_counts", "regions"} and all(isinstance(f, go.Figure) for f in figures.values())
    assert [t.name for t in figures["category_counts"].data] == ["adapters", "mlp_neurons", "random_adapters"]
    assert [t.name for t in figures["regions"].data] == ["prompt", "thinking", "answer"]
    result.write(tmp_path / "lib")
    assert json.loads((tmp_path / "lib" / "summary.json").read_text())["figures"][0].endswith("category_counts.html")
    assert (tmp_path / "lib" / "report.md").read_text() == result.report()
    pages = sorted(p.name for p in (tmp_path / "lib" / "features").glob("*.html"))
    assert pages == sorted(p.name for p in (out / "features").glob("*.html"))
    assert "no thinking delimiters" not in (out / "features" / pages[0]).read_text()  # the organism's <think>


def test_the_hmm_organism_is_read_with_its_own_word(tmp_path):
    """The hmm organism (3-digit operands, hesitates with "hmm"): its reasoning features get the
    ``output`` role exactly when "hmm" is among their top-3 logit-lens tokens (looking for "wait",
    a word its tokenizer does not know, found none), and the rule and report name "hmm"."""
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.studies.organisms import family

    org = family()["hmm"]
    org_pair = load_pair("custom", base=str(org.folder / "base"), target=str(org.folder / "target"))
    adapted = load_adapted(org_pair, org.adapters)
    cfg = study.FeaturesConfig(n_traces=24, batch_size=12, top_k=6, pages_per_category=1, max_reasoning_pages=2)
    result = study.run(org_pair, adapted, cfg, progress=False, pair_name="hmm")
    s = result.summary()
    assert set(s) >= _shipped_keys()
    hmm = org_pair.tokenizer.convert_tokens_to_ids("hmm")
    assert s["workload"]["hesitation_tokens"] == ["hmm"] and s["workload"]["word"] == "hmm"
    lens = result.store.lens_top_ids[:, :3]
    reasoning = [i for i, c in enumerate(result.categories) if c in C.REASONING and i < adapted.n_features]
    expected = sum(hmm in lens[i].tolist() for i in reasoning)
    assert s["role_counts"]["output"] == expected > 0
    assert "'hmm'" in s["rule"] and "'wait'" not in s["rule"]
    assert s["category_counts"] == C.summarize(result.categories[: adapted.n_features])["category_counts"]
    report = result.report()
    assert "'hmm'" in report and "(organism)" in report and "LM judge: not run" in report


# --------------------------------------------------------------------------- the chat stand-in


def test_chat_traces_are_labelled_per_token_by_the_workload(pair):  # noqa: F811
    """Every " Wait" the grader counts is a hesitation (after a slip) or a re-check token, the prompt
    is ``prompt``, and the labels' names come from the chat labeller, none of the organism's."""
    work = for_pair(pair)
    assert isinstance(work, ChatWorkload)
    corpus = census_traces(work, 12, "validation", seed=0)
    assert corpus.think_ids is None and corpus.word == "Wait" and corpus.hesitation_ids == work.variants
    names = corpus.label_names
    assert {"prompt", "step", "slip", "correction", "hesitation", "answer", "text"} <= set(names)
    assert not set(names) & {"operand_digit", "think_open", "separator"}
    traces = work.traces(12, "validation", seed=0)
    n_after_error = 0
    for row, src in zip(corpus.rows, traces):
        ids, labels = row["input_ids"], [names[i] for i in row["label_ids"]]
        assert len(labels) == len(ids) == len(src["input_ids"]) and ids == src["input_ids"]
        assert set(labels[: row["prompt_len"]]) == {PROMPT_LABEL}
        reply = labels[row["prompt_len"] :]
        waits = [lab for i, lab in zip(ids[row["prompt_len"] :], reply) if i in work.variants]
        assert set(waits) <= {"hesitation", "recheck"}
        graded = chat.grade(task.Problem(tuple(src["operands"])), src["response"])
        assert len(waits) == graded.n_hesitations
        assert waits.count("hesitation") == sum(graded.hesitation_after_error)
        n_after_error += waits.count("hesitation")
        first = reply.index("slip") if "slip" in reply else None
        if first is not None:  # a slipped step then its judging " Wait"
            assert "hesitation" in reply[first:]
    assert n_after_error > 0


def test_the_label_rule_reads_chat_labels(pair):  # noqa: F811
    """On the chat corpus' counts: a unit peaking on " Wait" after slips is ``hesitation``, one on
    the "." closing a slipped step ``error_detection`` (no other step ends there), one on prose
    ``format`` and one on right steps' digits ``arithmetic``."""
    work = for_pair(pair)
    corpus = census_traces(work, 24, "train", seed=0)
    names, vocab = corpus.label_names, len(work.tokenizer)
    base = torch.zeros(len(names), vocab)
    at = {}  # (label, token id) -> seen
    for row in corpus.rows:
        for lab, tok in zip(row["label_ids"], row["input_ids"]):
            base[lab, tok] += 1
            at[(names[lab], tok)] = True
    L = names.index
    dot = work.tokenizer.convert_tokens_to_ids(".")
    assert base[L("slip"), dot] > 0 and base[L("step"), dot] > base[L("slip"), dot]
    digit = next(t for (lab, t) in at if lab == "step" and work.tokenizer.decode([t]).strip().isdigit())
    prose = next(t for (lab, t) in at if lab == "text" and work.tokenizer.decode([t]).strip().isalpha())
    k = 4
    rows = [
        ([L("hesitation")] * k, [work.target] * k),
        ([L("slip")] * k, [dot] * k),
        ([L("text")] * k, [prose] * k),
        ([L("step")] * k, [digit] * k),
    ]
    labels = torch.tensor([r[0] for r in rows])
    tokens = torch.tensor([r[1] for r in rows])
    cats = C.classify_examples(labels, tokens, torch.ones(len(rows), dtype=torch.bool), base, label_names=names)
    assert cats == ["hesitation", "error_detection", "format", "arithmetic"]


@pytest.mark.slow
def test_the_census_runs_on_the_chat_pair(pair, adapters, tmp_path):  # noqa: F811
    """``python -m analyses.features --pair smollm2 --adapters DIR`` end to end: reasoning fraction
    with the MLP-neuron and random-adapter baselines, figures, dashboards, summary and report."""
    out = tmp_path / "features"
    with pytest.raises(script.cli.UsageError, match="--adapters DIR is required"):
        script.main(["--pair", "smollm2", "--out", str(out)])
    assert not out.exists()
    s = script.main(
        ["--pair", "smollm2", "--adapters", str(adapters), "--out", str(out), "--store", str(tmp_path / "st"), *SMALL]
        + ["--max-batch-gib", "0.0005"]  # long chat traces x every unit: the batch shrinks to fit
    )
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert set(s) >= _shipped_keys() and s["pair"] == "smollm2"
    work = s["workload"]
    assert work["name"] == "chat" and work["word"] == "Wait" and not work["thinking_span"]
    assert pair.tokenizer.convert_tokens_to_ids(work["hesitation_tokens"][0]) == for_pair(pair).target
    assert s["n_features"] == pair.n_layers * 16 and sum(s["category_counts"].values()) == s["n_features"]
    assert set(s["baselines"]) == {"mlp_neurons", "random_adapters"}
    d_mlp = pair.target.cfg.d_mlp
    assert s["baselines"]["mlp_neurons"]["n_features"] == pair.n_layers * d_mlp
    for part in (s, *s["baselines"].values()):
        assert 0.0 <= part["reasoning_fraction"] <= 1.0
    assert s["store"]["n_traces"] == 16 and s["store"]["n_tokens"] > 0
    assert "'Wait'" in s["rule"] and "'wait'" not in s["rule"]
    for name in ("category_counts.html", "category_counts.png", "regions.png", "index.html", "report.md"):
        assert (out / name).is_file(), name
    pages = list((out / "features").glob("*.html"))
    assert len(pages) == s["n_dashboards"] > 0
    assert all("the corpus has no thinking delimiters" in p.read_text() for p in pages)  # chat: no thinking span
    regions = (out / "regions.html").read_text()
    assert '"reply"' in regions and '"thinking"' not in regions
    report = (out / "report.md").read_text()
    assert "smollm2, chat workload" in report and "no thinking delimiters" in report
    stored = json.loads((tmp_path / "st" / "store.json").read_text())
    assert tuple(stored["config"]["label_names"]) == tuple(work["label_names"])
    assert 1 <= stored["config"]["batch_size"] < 8
