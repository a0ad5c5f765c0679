"""The command line on a tiny Qwen3 directory: save/load round trip, report, atomicity, bad arguments."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from test_llm_support import save_tiny_model, transformers

from s3sparse.llm import find_blocks, linear_layers, parse_pattern
from s3sparse.llm import cli as cli_module
from s3sparse.llm.cli import main

FAST = ["--calib", "pydoc:calib", "--n-samples", "4", "--seq-len", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen3"))


def _digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pruned(model_dir, tmp_path_factory):
    """One CLI run (true-obs, 2:4, one override) shared by the read-only tests; returns (out_dir, stdout, digest before)."""
    before = _digest(model_dir)
    out = str(tmp_path_factory.mktemp("pruned") / "out")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(["prune", model_dir, "--out", out, "--pattern", "2:4", "--method", "true-obs", "--opt", "ng=8",
                   "--override", "*.down_proj=4:8,method=sparsegpt", *FAST])
    assert rc == 0
    return out, buffer.getvalue(), before


def _leftovers(parent, name):
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


def test_saved_model_loads_with_automodel_and_keeps_the_pattern_in_every_linear(pruned):
    out, _, _ = pruned
    model = transformers.AutoModel.from_pretrained(out)
    name, blocks = find_blocks(model)
    layers = [layer for i, block in enumerate(blocks) for layer in linear_layers(block, f"{name}.{i}")]
    assert len(layers) == 14
    for layer in layers:
        pattern = parse_pattern("4:8" if layer.name.endswith("down_proj") else "2:4")
        assert pattern.holds(layer.module.weight), layer.name
        assert float((layer.module.weight == 0).float().mean()) == pytest.approx(0.5)


def test_round_trip_gives_the_pruned_weights_and_the_tokenizer(pruned, model_dir):
    out, _, _ = pruned
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    # pruned weights differ from the dense ones, everything outside the blocks is unchanged
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(model.model.embed_tokens.weight, dense.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, dense.lm_head.weight, rtol=0, atol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("the object")["input_ids"] == transformers.AutoTokenizer.from_pretrained(model_dir)("the object")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 5, 6, 7]])).logits).all()


def test_per_layer_table_and_sparsity_report_are_printed(pruned):
    _, stdout, _ = pruned
    header = next(line for line in stdout.splitlines() if line.startswith("layer "))
    for column in ("shape", "pattern", "method", "out err", "sec", "fp32 redos"):
        assert column in header
    rows = [line for line in stdout.splitlines() if line.startswith("model.layers.") and "x" in line.split()[1]]
    assert len(rows) == 14
    assert any("4:8" in r and "sparsegpt" in r for r in rows) and any("2:4" in r and "true-obs" in r for r in rows)
    assert "whole model:" in stdout and "50.00% of their" in stdout and "saved the pruned model" in stdout


def test_json_report_says_what_was_done(pruned):
    out, _, _ = pruned
    with open(os.path.join(out, "s3sparse.json")) as f:
        data = json.load(f)
    assert data["s3sparse"] and data["recipe"]["pattern"] == "2:4" and data["recipe"]["method"] == "true-obs"
    assert data["recipe"]["options"]["ng"] == 8
    assert data["recipe"]["overrides"] == [{"match": "*.down_proj", "pattern": "4:8", "method": "sparsegpt"}]
    assert data["calibration"]["n_samples"] == 4 and data["calibration"]["seq_len"] == 32
    assert len(data["layers"]) == 14 and all(0 < layer["error"] < 1 for layer in data["layers"])
    assert data["sparsity"]["pruned_layer_sparsity"] == pytest.approx(0.5)


def test_model_dir_is_never_touched(pruned, model_dir):
    _, _, before = pruned
    assert _digest(model_dir) == before
    assert not any(name.startswith(".") for name in os.listdir(os.path.dirname(model_dir)))


def test_eval_perplexity(pruned, model_dir, tmp_path, capsys):
    out, _, _ = pruned
    report = tmp_path / "eval.json"
    rc = main(["eval", out, "--dense", model_dir, "--text", "pydoc:heldout", "--seq-len", "32", "--n-samples", "4",
               "--json", str(report)])
    assert rc == 0
    assert "perplexity:" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["kind"] == "causal-lm" and data["windows"] == 4
    assert 1 < data["perplexity"] < 1e6 and 1 < data["dense_perplexity"] < 1e6


def test_recipe_file(model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "pattern: 2:4\nmethod: obd\nskip: [lm_head, '*.k_proj']\n"
        "overrides:\n  - match: '*.mlp.*'\n    pattern: coupled-2:4\n    method: sparsegpt\n    options: {damp: 1e-2}\n"
        "calibration: {source: pydoc:calib, n_samples: 4, seq_len: 32, seed: 1}\n"
    )
    out = tmp_path / "out"
    assert main(["prune", model_dir, "--out", str(out), "--config", str(recipe), "--no-progress"]) == 0
    data = json.loads((out / "s3sparse.json").read_text())
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["model.layers.0.mlp.up_proj"]["pattern"] == "coupled-2:4"
    assert layers["model.layers.0.mlp.up_proj"]["method"] == "sparsegpt"
    assert layers["model.layers.0.self_attn.q_proj"]["method"] == "obd"
    assert layers["model.layers.0.self_attn.k_proj"]["status"] == "skipped"
    assert data["calibration"]["seed"] == 1


def test_same_seed_twice_gives_identical_files(model_dir, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert main(["prune", model_dir, "--out", str(out), "--pattern", "2:4", "--method", "sparsegpt", *FAST]) == 0
        outs.append(out)
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keyboard_interrupt_mid_run_leaves_no_out_dir(model_dir, tmp_path, monkeypatch, capsys):
    from s3sparse.llm import pipeline

    real, calls = pipeline._prune_layer, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the second block
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_prune_layer", interrupted)
    out = tmp_path / "out"
    assert main(["prune", model_dir, "--out", str(out), *FAST]) == 130
    assert not out.exists() and _leftovers(tmp_path, "out") == []
    assert "interrupted" in capsys.readouterr().err


def test_keyboard_interrupt_while_saving_leaves_no_out_dir(model_dir, tmp_path, monkeypatch):
    from s3sparse.llm import save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "_copy_extra_files", interrupted)  # after the weights are written to the staging dir
    out = tmp_path / "out"
    assert main(["prune", model_dir, "--out", str(out), *FAST]) == 130
    assert not out.exists() and _leftovers(tmp_path, "out") == []


# A real Ctrl-C (SIGINT to the process) at one moment of `s3sparse prune --overwrite`, in a child process
# whose save is instrumented: the hook sends SIGINT to the process itself, then gives it time to land.
_INTERRUPTING_RUN = r"""
import atexit, os, shutil, signal, sys, time
from s3sparse.llm import cli, save

moment = sys.argv[1]
# A process started by a script's background job inherits SIGINT ignored, and
# Python then leaves it ignored: restore the handler an interactive run has.
signal.signal(signal.SIGINT, signal.default_int_handler)

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)

if moment in ("writing", "cleaning up"):  # while the new files are written (into the temporary directory)
    copy = save._copy_extra_files
    def copy_then_interrupted(*args):
        copy(*args)
        ctrl_c()
    save._copy_extra_files = copy_then_interrupted
if moment == "cleaning up":  # and again while the temporary directory is removed
    rmtree = shutil.rmtree
    def interrupted_rmtree(*args, **kwargs):
        ctrl_c()
        rmtree(*args, **kwargs)
    shutil.rmtree = interrupted_rmtree
if moment == "swapping":  # after the old OUT_DIR was moved aside, before the new one is moved in
    rename = os.rename
    def interrupted_rename(src, dst):
        rename(src, dst)
        if ".old-" in os.path.basename(dst):
            ctrl_c()
    os.rename = interrupted_rename
if moment == "saved":  # right after the save returned
    save_pruned_model = save.save_pruned_model
    def saved_then_interrupted(*args, **kwargs):
        out = save_pruned_model(*args, **kwargs)
        ctrl_c()
        return out
    save.save_pruned_model = saved_then_interrupted
if moment == "exiting":  # while the interpreter shuts down, after main() returned 0
    atexit.register(ctrl_c)

sys.argv = ["s3sparse", *sys.argv[2:]]
cli.console_main()
"""


@pytest.mark.parametrize("moment", ["writing", "cleaning up", "swapping", "saved", "exiting"])
def test_ctrl_c_at_any_moment_exits_130_and_leaves_the_old_or_the_new_out_dir(model_dir, tmp_path, moment):
    out = tmp_path / "out"
    _old_s3sparse_dir(out)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli_module.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTING_RUN, moment, "prune", model_dir, "--out", str(out), "--overwrite", *FAST],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert proc.returncode == 130, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    old = (out / "old.txt").exists()
    if old:  # the complete old directory, untouched
        assert sorted(os.listdir(out)) == ["old.txt", "s3sparse.json"] and (out / "s3sparse.json").read_text() == '{"s3sparse": "old"}'
        assert "nothing was written" in lines[0]
    else:  # the complete new one
        data = json.loads((out / "s3sparse.json").read_text())
        assert len(data["layers"]) == 14
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
        assert parse_pattern("2:4").holds(model.model.layers[1].mlp.down_proj.weight)
        assert str(out) in lines[0] or moment == "exiting", lines[0]
    assert old == (moment in ("writing", "cleaning up")), (moment, proc.stderr)
    assert _leftovers(tmp_path, "out") == []


def _old_s3sparse_dir(out):
    """A directory as an earlier s3sparse run left it (its manifest, and one more file)."""
    out.mkdir()
    (out / "s3sparse.json").write_text('{"s3sparse": "old"}')
    (out / "old.txt").write_text("old")


def test_overwrite_replaces_and_a_failed_overwrite_keeps_the_old_dir(model_dir, tmp_path, monkeypatch):
    from s3sparse.llm import save

    out = tmp_path / "out"
    _old_s3sparse_dir(out)

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save, "_copy_extra_files", failing)
    with pytest.raises(OSError, match="disk full"):
        main(["prune", model_dir, "--out", str(out), "--overwrite", *FAST])
    assert (out / "old.txt").read_text() == "old" and _leftovers(tmp_path, "out") == []
    monkeypatch.undo()
    assert main(["prune", model_dir, "--out", str(out), "--overwrite", *FAST]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path, "out") == []


def test_overwrite_replaces_only_a_directory_that_s3sparse_wrote(model_dir, tmp_path, capsys):
    from s3sparse import S3Error
    from s3sparse.llm.save import check_output_dir

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data").mkdir()
    before = _digest(str(out))
    line = _usage_error(["prune", model_dir, "--out", str(out), "--overwrite", *FAST], capsys)
    assert "not written by s3sparse" in line and "--overwrite" in line and str(out) in line and "s3sparse.json" in line
    assert _digest(str(out)) == before and _leftovers(tmp_path, "mine") == []
    with pytest.raises(S3Error, match="not written by s3sparse"):  # the library check: an S3Error too
        check_output_dir(str(out), None, overwrite=True)
    (out / "s3sparse.json").write_text("not json")  # a file of that name is not enough: it must be ours
    assert "not written by s3sparse" in _usage_error(["prune", model_dir, "--out", str(out), "--overwrite", *FAST], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()  # nothing in it to lose: replaced
    assert main(["prune", model_dir, "--out", str(empty), "--overwrite", *FAST]) == 0
    assert (empty / "s3sparse.json").exists()
    capsys.readouterr()


def _usage_error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3sparse: error: "), err
    return lines[0]


def test_bad_arguments_exit_2_with_one_line(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["prune", model_dir, "--out", out, *FAST]
    assert "unknown pattern 'bogus'" in _usage_error([*base, "--pattern", "bogus"], capsys)
    assert "unknown method 'bogus'" in _usage_error([*base, "--method", "bogus"], capsys)
    line = _usage_error([*base, "--pattern", "2:6"], capsys)
    assert "model.layers.0.self_attn.q_proj" in line and "64x64" in line and "K=64 is not a multiple of 6" in line
    line = _usage_error([*base, "--override", "*.mlp.down_proj=nm:3:5"], capsys)
    assert "model.layers.0.mlp.down_proj (weight 64x128)" in line and "K=128 is not a multiple of 5" in line
    assert "does not exist" in _usage_error(["prune", model_dir, "--out", out, "--calib", str(tmp_path / "nope.txt")], capsys)
    os.mkdir(out)
    assert "already exists; pass --overwrite" in _usage_error(base, capsys)
    # The existence check comes after the argument checks: it does not hide them.
    assert "unknown method 'bogus'" in _usage_error([*base, "--method", "bogus"], capsys)
    assert "unknown pattern 'bogus'" in _usage_error([*base, "--pattern", "bogus"], capsys)
    assert "does not exist" in _usage_error([*base, "--calib", str(tmp_path / "nope.txt")], capsys)
    assert "--n-samples must be >= 1" in _usage_error([*base, "--n-samples", "0"], capsys)
    os.rmdir(out)
    assert "has no option bogus" in _usage_error([*base, "--method", "sparsegpt", "--opt", "bogus=1"], capsys)
    assert "--override" in _usage_error([*base, "--override", "nonsense"], capsys)
    assert "does not exist" in _usage_error(["prune", str(tmp_path / "missing"), "--out", out, *FAST], capsys)
    assert "--out" in _usage_error(["prune", model_dir, *FAST], capsys)
    assert "overlap" in _usage_error(["prune", model_dir, "--out", os.path.join(model_dir, "sub"), *FAST], capsys)
    assert "invalid int" in _usage_error([*base, "--n-samples", "many"], capsys)
    assert "longer than the model's maximum" in _usage_error([*base, "--seq-len", "100000"], capsys)
    assert not os.path.exists(out) and _leftovers(str(tmp_path), "out") == []
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _usage_error([*base, "--device", "cuda"], capsys)


def test_python_dash_m_exit_code_and_one_line(model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "s3sparse", "prune", model_dir, "--out", str(tmp_path / "o"), "--pattern", "3:9:x",
         "--calib", "pydoc"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown pattern '3:9:x'" in proc.stderr


def test_console_script(model_dir, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "s3sparse")
    if not os.path.isfile(script):
        pytest.skip("the s3sparse console script is not installed (pip install -e . installs it)")
    proc = subprocess.run([script, "prune", model_dir, "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "none.txt")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "calibration file" in proc.stderr and "does not exist" in proc.stderr


# ------------------------------------------------------------------ errors and help (issue 18, item 7)
def _subcommands():
    import argparse

    from s3sparse.llm.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_usage_errors_are_s3_errors():
    from s3sparse import S3Error
    from s3sparse.llm import UsageError

    assert issubclass(UsageError, S3Error) and issubclass(UsageError, ValueError)
    with pytest.raises(S3Error, match="unknown pattern 'bogus'"):
        parse_pattern("bogus")


@pytest.mark.parametrize("command", ["prune", "eval", "pack"])
def test_every_option_of_every_command_has_a_help_text(command, capsys):
    import argparse

    sub = _subcommands()[command]
    undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help or a.help == argparse.SUPPRESS]
    assert undocumented == [], (command, undocumented)
    text = _help(command, capsys)
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text, (command, option)


@pytest.mark.parametrize("command, required", [("prune", ["--out OUT_DIR", "--calib SOURCE"]),
                                               ("eval", ["--text SOURCE"]), ("pack", ["--out PACKED_DIR"])])
def test_required_options_show_as_required(command, required, capsys):
    text = _help(command, capsys)
    usage = " ".join(text.split("\n\n")[0].split())
    section = text.split("\nrequired:\n")[1].split("\n\n")[0]
    for option in required:
        flag = option.split()[0]
        assert option in usage and f"[{option}" not in usage, (command, usage)
        assert flag in section, (command, section)


def test_prune_help_lists_every_pattern_name_with_its_meaning_and_every_alias(capsys):
    from s3sparse.patterns import _FIXED, PATTERN_ALIASES, PATTERN_NAMES

    text = " ".join(_help("prune", capsys).split())
    for name, meaning in PATTERN_NAMES:
        assert f"{name} {meaning}" in text, name
    assert "2 of their 4 column PAIRS" in text  # 4:8 is the paper's, not 4 of 8 weights
    for alias, name in PATTERN_ALIASES.items():
        assert f"{alias} = {name}" in text and parse_pattern(alias).name == name, alias
    assert set(_FIXED) <= {name for name, _ in PATTERN_NAMES}


def test_eval_and_pack_show_progress_like_prune(pruned, model_dir, tmp_path, capsys):
    out, _, _ = pruned
    eval_args = ["eval", out, "--dense", model_dir, "--text", "pydoc:heldout", "--seq-len", "32", "--n-samples", "4"]
    assert main(eval_args) == 0
    err = capsys.readouterr().err
    assert "perplexity:" in err and "perplexity (dense):" in err and "4/4" in err, err
    assert main([*eval_args, "--no-progress"]) == 0
    assert "4/4" not in capsys.readouterr().err
    assert main(["pack", out, "--out", str(tmp_path / "packed")]) == 0
    err = capsys.readouterr().err
    assert "layers:" in err and "14/14" in err, err
    assert main(["pack", out, "--out", str(tmp_path / "packed2"), "--no-progress"]) == 0
    assert "14/14" not in capsys.readouterr().err
