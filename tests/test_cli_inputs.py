"""Bad input on the command lines: a one-line error and exit status 2, before any model loads,
and nothing written. One row per bad input; each runs the CLI's ``main`` as ``python -m`` does."""

import importlib

import pytest
import torch

from mechdiff import models
from mechdiff.cli import run

GPU = torch.cuda.is_available()
ROWS = [  # (module, argv, the error line's expected start)
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--steps", "0"], "error: --steps 0: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--steps", "-5"], "error: --steps -5: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--batch-size", "-2"], "error: --batch-size -2: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--d-sae", "0"], "error: --d-sae 0: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--checkpoint-every", "0"],
     "error: --checkpoint-every 0: must be >= 1"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--lr", "0"], "error: --lr 0.0: must be a number > 0"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--activation", "gelu"],
     "error: --activation gelu: must be one of relu, topk"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--l1", "-1"], "error: --l1 -1.0: must be a number >= 0"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--recipe", "missing.json"], "error: --recipe missing.json:"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--device", "tpu"],
     "error: --device tpu: not a torch device"),
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--pair", "custom", "--base", "models/base",
                                    "--target", "models/target"], "error: --base models/base: no such folder"),
    ("mechdiff.adapters.__main__", ["sweep", "--l1", "0.1", "--out", "OUT", "--steps", "0"],
     "error: --steps 0: must be >= 1"),
    ("mechdiff.adapters.__main__", ["eval", "--adapters", "nowhere"], "error: --adapters nowhere: no such folder"),
    ("mechdiff.adapters.__main__", ["eval", "--n-eval-traces", "0"], "error: --n-eval-traces 0: must be >= 1"),
    ("mechdiff.lora.__main__", ["train", "--out", "OUT", "--steps", "0"], "error: --steps 0: must be >= 1"),
    ("mechdiff.lora.__main__", ["train", "--out", "OUT", "--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
    ("mechdiff.lora.__main__", ["train", "--out", "OUT", "--rank", "0"], "error: --rank 0: must be >= 1"),
    ("mechdiff.lora.__main__", ["train", "--out", "OUT", "--modules", "q", "zz"], "error: --modules q zz: must be"),
    ("mechdiff.lora.__main__", ["--device", "tpu", "train", "--out", "OUT"], "error: --device tpu:"),
    ("mechdiff.lora.__main__", ["eval", "nowhere"], "error: nowhere: no such LoRA folder"),
    ("mechdiff.lora.__main__", ["eval"], "error: give LoRA folders"),
    ("mechdiff.real.__main__", ["train", "--steps", "0"], "error: --steps 0: must be >= 1"),
    ("mechdiff.real.__main__", ["train", "--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
    ("mechdiff.real.__main__", ["train", "--run", "../x"], "error: --run ../x: run must be a plain folder"),
    ("mechdiff.real.__main__", ["check", "--device", "tpu"], "error: --device tpu:"),
    ("mechdiff.real.__main__", ["eval", "--n", "0"], "error: --n 0: must be >= 1"),
    ("analyses.features", ["--out", "OUT", "--adapters", "nowhere"], "error: --adapters nowhere: no such folder"),
    ("analyses.features", ["--out", "OUT", "--adapters", "random:x"], "error: --adapters random:x:"),
    ("analyses.features", ["--out", "OUT", "--device", "tpu"], "error: --device tpu:"),
    ("analyses.lora", ["--out", "OUT", "--ranks", "1", "0"], "error: --ranks 1 0: every rank must be >= 1"),
    ("analyses.lora", ["--out", "OUT", "--device", "tpu"], "error: --device tpu:"),
    ("analyses.real", ["--out", "OUT", "--d-sae", "0"], "error: --d-sae 0: must be >= 1"),
    ("analyses.real", ["--out", "OUT", "--sweep", "512:0"], "error: --sweep '512:0': each candidate is WIDTH:K"),
    ("analyses.real", ["--out", "OUT", "--sweep-steps", "0"], "error: --sweep-steps 0: must be >= 1"),
    ("analyses.real", ["--out", "OUT", "--adapter-resample", "-1"], "error: --adapter-resample -1: must be >= 0"),
    ("analyses.real", ["--out", "OUT", "--pair", "organism"], "error: --pair organism: this study is SmolLM2's"),
]  # fmt: skip
if not GPU:  # on a GPU machine these are valid devices
    ROWS += [
        (m, a, "error: --device cuda: no CUDA GPU is visible")
        for m, a in (
            ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--device", "cuda"]),
            ("mechdiff.lora.__main__", ["--device", "cuda", "train", "--out", "OUT"]),
            ("mechdiff.real.__main__", ["check", "--device", "cuda"]),
            ("analyses.features", ["--out", "OUT", "--device", "cuda"]),
            ("analyses.lora", ["--out", "OUT", "--device", "cuda"]),
            ("analyses.real", ["--out", "OUT", "--device", "cuda"]),
        )
    ]
ARGPARSE_ROWS = [  # argparse's own refusals: usage line, then the error line, exit 2
    ("mechdiff.adapters.__main__", ["train", "--out", "OUT", "--dtype", "float8"], "--dtype: invalid choice"),
    ("mechdiff.lora.__main__", ["--dtype", "float8", "train", "--out", "OUT"], "--dtype: invalid choice"),
    ("mechdiff.real.__main__", ["check", "--dtype", "float8"], "--dtype: invalid choice"),
    ("analyses.features", ["--dtype", "float8"], "--dtype: invalid choice"),
    ("analyses.lora", ["--dtype", "float8"], "--dtype: invalid choice"),
    ("analyses.real", ["--dtype", "float8"], "--dtype: invalid choice"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder; loading any model fails the test (errors come first)."""
    monkeypatch.chdir(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_pair", no_model)
    monkeypatch.setattr(models, "load_hooked", no_model)
    from mechdiff.real import smollm2

    monkeypatch.setattr(smollm2, "load_hf", no_model)
    monkeypatch.setattr(smollm2, "load_smollm2", no_model)
    return tmp_path


def _call(module, argv, workdir, capsys):
    argv = [str(workdir / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        run(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    return exit_.value.code, err.strip().splitlines()


def _id(module, argv):
    return " ".join([module.removesuffix(".__main__"), *argv])


@pytest.mark.parametrize("module,argv,message", ROWS, ids=[_id(m, a) for m, a, _ in ROWS])
def test_bad_input_is_one_line_exit_2_and_nothing_written(module, argv, message, workdir, capsys):
    code, lines = _call(module, argv, workdir, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert list(workdir.iterdir()) == []  # no output folder, no runs/, no checkpoint


@pytest.mark.parametrize("module,argv,message", ARGPARSE_ROWS, ids=[m for m, _, _ in ARGPARSE_ROWS])
def test_dtype_is_a_fixed_choice_everywhere(module, argv, message, workdir, capsys):
    code, lines = _call(module, argv, workdir, capsys)
    assert code == 2 and message in lines[-1] and "bfloat16" in lines[-1]
    assert list(workdir.iterdir()) == []
