"""``python -m attribution``: bad input is a one-line error before any model loads or file is written."""

import os

import pytest

import mechdiff.cli
from attribution import __main__ as cli
from mechdiff.cli import run


@pytest.fixture
def no_model(monkeypatch):
    def refuse(args):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(mechdiff.cli, "load_pair_from_args", refuse)


def _rows(tmp):
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    return [  # (arguments, what the one line says)
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "A 3 zebra 2 = giraffe"], "2 word(s) not in the tokenizer's vocabulary ('zebra', 'giraffe')"),
        (["--pair", "smollm2"], "ships adapters for the organism only"),
        (["--adapters", str(tmp / "nowhere")], "no such folder"),
        (["--out", str(a_file)], "exists and is not a folder"),
        (["--out", str(a_file / "graphs")], "is not a folder"),
        (["--max-feature-nodes", "0"], "--max-feature-nodes 0: must be >= 1"),
        (["--batch-size", "-3"], "--batch-size -3: must be >= 1"),
        (["--examples", "-1"], "--examples -1: must be >= 0"),
        (["--node-threshold", "0"], "--node-threshold 0.0: must be in (0, 1]"),
        (["--edge-threshold", "1.5"], "--edge-threshold 1.5: must be in (0, 1]"),
        (["--target-token", " "], "--target-token is empty"),
        (["--device", "tpu"], "--device tpu: not a torch device"),
        (["--pair", "custom", "--adapters", "random"], "--pair custom needs --base FOLDER"),
        (["--graphs", str(a_file)], "--graphs " + str(a_file) + ": exists and is not a folder"),
        (["--trace", "-1"], "--trace -1: must be >= 0"),
        (["--trace", "2", "--prompt", "A 3 2"], "--trace picks a workload trace; it cannot go with --prompt"),
        (["serve", str(tmp)], "no graph-metadata.json"),
        (["serve", str(tmp), "--port", "70000"], "--port 70000: not a port number"),
    ]


ROW_IDS = [
    "empty prompt",
    "blank prompt",
    "unknown words",
    "auto adapters off the organism",
    "missing adapters",
    "out is a file",
    "out under a file",
    "zero feature nodes",
    "negative batch",
    "negative examples",
    "zero node threshold",
    "edge threshold > 1",
    "blank target",
    "tpu",
    "custom without folders",
    "graphs is a file",
    "negative trace",
    "trace with prompt",
    "serve an empty folder",
    "serve a bad port",
]


@pytest.mark.parametrize("row", range(len(ROW_IDS)), ids=ROW_IDS)
def test_bad_input_is_one_line_before_any_work(row, tmp_path, no_model, capsys):
    argv, message = _rows(tmp_path)[row]
    out = tmp_path / "out"
    if "--out" not in argv and argv[0] != "serve":
        argv = [*argv, "--out", str(out)]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run(cli.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_out_is_refused(tmp_path, no_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        run(cli.main, ["--out", str(locked / "graphs")])
    assert "is not writable" in capsys.readouterr().err


def test_unknown_words_are_found_by_the_organisms_tokenizer():
    from mechdiff.models import ORGANISM_DIR, load_tokenizer

    tok = load_tokenizer(ORGANISM_DIR / "base")
    assert cli.unknown_words(tok, "A 3 2 = <think> p0 wait") == []
    assert cli.unknown_words(tok, "A 3 Wait 2 foo") == ["Wait", "foo"]


def test_two_traces_export_two_graphs_into_one_shared_folder(tmp_path):
    import json

    shared = tmp_path / "graphs"
    for n in (0, 1):
        run(
            cli.main,
            [
                "--trace",
                str(n),
                "--max-feature-nodes",
                "24",
                "--examples",
                "8",
                "--out",
                str(tmp_path / f"out{n}"),
                "--graphs",
                str(shared),
            ],
        )
    index = json.loads((shared / "graph-metadata.json").read_text())["graphs"]
    assert len(index) == 2 and index[0]["slug"] != index[1]["slug"]
    prompts = [json.loads((tmp_path / f"out{n}" / "summary.json").read_text())["prompt"] for n in (0, 1)]
    assert prompts[0] != prompts[1]  # different traces, each cut before its "wait"
    for g in index:
        assert (shared / f"{g['slug']}.json").is_file()
    assert not (tmp_path / "out0" / "circuit-tracer").exists()  # the shared folder took the graph
