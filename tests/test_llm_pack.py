"""Model level packing: `s3sparse pack PRUNED_DIR --out PACKED_DIR`, `pack_model`, `load_packed`."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from test_llm_support import save_tiny_model, tiny_calibration, tiny_model, transformers

from s3sparse.llm import load_packed, pack_model, prune_model
from s3sparse.llm.cli import main
from s3sparse.llm.pack import MANIFEST_NAME
from s3sparse.sparse import PackedLinear

FAST = ["--calib", "pydoc:calib", "--n-samples", "4", "--seq-len", "32", "--no-progress"]
# One pattern of each kind on the tiny Qwen3 (hidden 64, MLP 128): row-local, blocks, coupled, row-coupled.
OVERRIDES = ["--override", "*.down_proj=4:8", "--override", "*.q_proj=coupled-2:4", "--override", "*.o_proj=block16-rows"]


def _run(argv):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = main(argv)
    return rc, buffer.getvalue()


def _ids(n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (n, length), generator=g)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model_dir = save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen3"))
    out = str(tmp_path_factory.mktemp("pruned") / "out")
    rc, _ = _run(["prune", model_dir, "--out", out, "--pattern", "2:4", "--method", "sparsegpt", *OVERRIDES, *FAST])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def packed_dir(pruned_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed") / "out")
    rc, text = _run(["pack", pruned_dir, "--out", out])
    assert rc == 0, text
    return out, text


def test_pack_swaps_every_pruned_linear_and_reproduces_the_pruned_model(pruned_dir, packed_dir):
    out, text = packed_dir
    dense = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    packed = load_packed(out)
    with open(os.path.join(pruned_dir, "s3sparse.json")) as f:
        pruned_layers = [layer for layer in json.load(f)["layers"] if layer["status"] == "pruned"]
    assert pruned_layers
    for layer in pruned_layers:
        module = packed.get_submodule(layer["name"])
        assert isinstance(module, PackedLinear), layer["name"]
        assert torch.equal(module.weight, dense.get_submodule(layer["name"]).weight), layer["name"]
    assert isinstance(packed.lm_head, torch.nn.Linear)  # skipped by the pruner: left alone
    ids = _ids()
    with torch.no_grad():
        want, got = dense(ids).logits, packed(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name in ("2:4", "4:8", "coupled-2:4", "block16-rows"):
        assert name in text  # the per-layer table names every pattern


def test_packed_layers_are_smaller(packed_dir):
    out, _ = packed_dir
    with open(os.path.join(out, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    layers = manifest["pack"]["layers"]
    assert {layer["kind"] for layer in layers} == {"packed"}
    for layer in layers:
        limit = 0.58 if layer["pattern"] == "2:4" else 0.56  # fp32 values, + the small index tables
        assert layer["bytes_after"] < limit * layer["bytes_before"], layer
        assert layer["max_abs_diff"] is not None and layer["max_abs_diff"] < 1e-4
    assert all(entry["kind"] == "packed" for entry in manifest["modules"].values())


def test_transformers_refuses_a_packed_dir_and_names_load_packed(pruned_dir, packed_dir):
    out, _ = packed_dir
    for loader in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoModelForCausalLM,
                   transformers.Qwen3ForCausalLM, transformers.Qwen3Config):
        with pytest.raises(Exception, match=r"load_packed") as info:
            loader.from_pretrained(out)
        assert not isinstance(info.value, AttributeError), loader
    with pytest.raises(Exception, match="load_packed"):
        transformers.pipeline("text-generation", model=out)
    dense_config = transformers.AutoConfig.from_pretrained(pruned_dir)
    for loader in (transformers.AutoModelForCausalLM, transformers.Qwen3ForCausalLM):  # a config given by hand
        with pytest.raises(OSError, match="model.safetensors"):
            loader.from_pretrained(out, config=dense_config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer still loads
    assert tokenizer("the object")["input_ids"] == transformers.AutoTokenizer.from_pretrained(pruned_dir)("the object")["input_ids"]


def test_load_packed_moves_to_a_device_and_reads_the_first_format(packed_dir, tmp_path):
    import shutil

    from s3sparse.llm.pack import WEIGHTS_NAME

    out, _ = packed_dir
    ids = _ids()
    with torch.no_grad():
        want = load_packed(out, device="cpu")(ids).logits
    # A directory written before the guard (format 1): the model's config.json and model.safetensors.
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    (old / "config.json").write_text(json.dumps(manifest.pop("config")))
    os.rename(old / WEIGHTS_NAME, old / "model.safetensors")
    manifest["version"] = 1
    del manifest["weights"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with torch.no_grad():
        torch.testing.assert_close(load_packed(str(old))(ids).logits, want, rtol=0, atol=0)


def test_eval_loads_a_packed_dir_with_load_packed(pruned_dir, packed_dir, tmp_path, capsys):
    out, _ = packed_dir
    results = {}
    for name, path in (("pruned", pruned_dir), ("packed", out)):
        report = tmp_path / f"{name}.json"
        rc, _ = _run(["eval", path, "--dense", pruned_dir, "--text", "pydoc:heldout", "--seq-len", "32",
                      "--n-samples", "4", "--json", str(report)])
        assert rc == 0, capsys.readouterr().err
        results[name] = json.loads(report.read_text())
    # the packed model computes what the pruned one does (random layers would be far off)
    assert results["packed"]["perplexity"] == pytest.approx(results["pruned"]["perplexity"], rel=1e-5)
    assert results["packed"]["kind"] == "causal-lm"
    rc, _ = _run(["eval", pruned_dir, "--dense", out, "--text", "pydoc:heldout", "--seq-len", "32", "--n-samples", "4"])
    assert rc == 0  # as the reference too
    rc, _ = _run(["eval", out, "--text", "pydoc:heldout", "--seq-len", "32", "--n-samples", "4", "--dtype", "bfloat16"])
    assert rc == 2 and "--dtype auto" in capsys.readouterr().err


def test_an_encoder_packed_dir_is_evaluated_against_its_dense_model(tmp_path, capsys):
    dense = save_tiny_model(str(tmp_path / "bert"), "bert")
    pruned, packed = str(tmp_path / "pruned"), str(tmp_path / "packed")
    assert _run(["prune", dense, "--out", pruned, "--pattern", "2:4", "--method", "sparsegpt", *FAST])[0] == 0
    assert _run(["pack", pruned, "--out", packed])[0] == 0
    results = {}
    for path in (pruned, packed):  # no --dense: found through s3sparse.json / s3sparse-packed.json
        report = tmp_path / "eval.json"
        rc, _ = _run(["eval", path, "--text", "pydoc:heldout", "--seq-len", "32", "--n-samples", "16", "--json", str(report)])
        assert rc == 0, capsys.readouterr().err
        results[path] = json.loads(report.read_text())
        assert results[path]["dense"] == os.path.abspath(dense)
    assert results[packed]["mean_cosine"] == pytest.approx(results[pruned]["mean_cosine"], abs=1e-6)
    assert results[packed]["mean_cosine"] > 0.5


def test_prune_and_pack_refuse_a_packed_dir(packed_dir, tmp_path, capsys):
    out, _ = packed_dir
    for argv in (["prune", out, "--out", str(tmp_path / "o"), *FAST], ["pack", out, "--out", str(tmp_path / "o")]):
        rc, _ = _run(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "is a packed model" in err and "load_packed" in err, err
    assert not os.path.exists(tmp_path / "o")


def test_load_packed_with_torch_compile(packed_dir):
    out, _ = packed_dir
    model = load_packed(out)
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    x = torch.randn(3, layer.in_features)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


def _fused_equals_unfused(out, device):
    """``load_packed(fuse=True)`` stacks gate/up (both 2:4 here) and leaves q/k/v (q is coupled 2:4, k/v 2:4:
    not one pattern) alone; its logits equal the unfused model's."""
    from s3sparse.sparse.fuse import SiblingSlice, StackedSiblings

    plain, fused = load_packed(out, device=device), load_packed(out, device=device, fuse=True)
    mlp, attn = fused.model.layers[0].mlp, fused.model.layers[0].self_attn
    assert isinstance(mlp.gate_proj, SiblingSlice) and isinstance(mlp.up_proj, SiblingSlice)
    stacked = [m for m in mlp.children() if isinstance(m, StackedSiblings)]
    assert len(stacked) == 1 and isinstance(stacked[0].layer, PackedLinear)
    assert isinstance(attn.q_proj, PackedLinear) and isinstance(attn.k_proj, PackedLinear)
    ids = _ids().to(device)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_packed_fuse_stacks_siblings_of_one_pattern(packed_dir):
    out, _ = packed_dir
    _fused_equals_unfused(out, "cpu")
    with pytest.raises(Exception, match="`fuse` must be True or False"):
        load_packed(out, fuse="yes")


@pytest.mark.cuda
def test_load_packed_fuse_on_cuda(packed_dir):
    out, _ = packed_dir
    _fused_equals_unfused(out, "cuda")
    fused = load_packed(out, device="cuda", fuse=True)
    assert all(m._tables_ok for m in fused.modules() if isinstance(m, PackedLinear))  # the stacked ones too


def _check_on(model, device, dtype):
    """Every PackedLinear of ``model`` sits on ``device`` with ``dtype`` values; its index tensors stay integers."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers
    for layer in layers:
        assert layer.values.device.type == torch.device(device).type and layer.values.dtype == dtype
        assert layer.meta.dtype == torch.int32 and layer.meta.device == layer.values.device
        assert layer.block_off.dtype == layer.elem_off.dtype == layer.geometry.dtype == torch.int64


def test_load_packed_device_and_dtype(pruned_dir, packed_dir):
    out, _ = packed_dir
    dense = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).eval().double()
    packed = load_packed(out, device="cpu", dtype=torch.float64)
    _check_on(packed, "cpu", torch.float64)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(Exception, match="floating torch.dtype"):
        load_packed(out, dtype=torch.int32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_packed_on_cuda_matches_the_pruned_dense_model(pruned_dir, packed_dir, dtype):
    out, _ = packed_dir
    dense = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).eval().to(device="cuda", dtype=dtype)
    packed = load_packed(out, device="cuda", dtype=dtype)
    _check_on(packed, "cuda", dtype)
    for layer in (m for m in packed.modules() if isinstance(m, PackedLinear)):
        assert layer.weight.device.type == "cuda"  # packed_to_dense on the GPU
        assert layer._tables_ok  # checked at load: compiled calls launch without a sync
    name = next(n for n, m in packed.named_modules() if isinstance(m, PackedLinear))
    assert torch.equal(packed.get_submodule(name).weight, dense.get_submodule(name).weight)
    ids = _ids().cuda()
    with torch.no_grad():
        want, got = dense(ids).logits.float(), packed(ids).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp16: another accumulation order than cuBLAS, output rounding
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # The packed model on the GPU computes what it computes on the CPU (in the fp32 it was packed in).
    with torch.no_grad():
        on_cpu = load_packed(out)(ids.cpu()).logits
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=tol, atol=tol)


def test_channel_patterns_are_compacted_into_smaller_dense_layers(tmp_path):
    model = tiny_model("llama")
    calib = tiny_calibration(n_samples=4, seq_len=32)
    report = prune_model(model, calib, pattern="dense", method="magnitude", progress=False,
                         overrides={"*.mlp.gate_proj": "channels:0.5", "*.mlp.up_proj": "channels:0.5"})
    layer_patterns = {r.name: r.pattern for r in report.layers if r.status == "pruned"}
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    result = pack_model(model, layer_patterns)
    assert {layer.kind for layer in result.layers} == {"compacted"}
    assert model.config.intermediate_size < 128
    for name in layer_patterns:
        assert type(model.get_submodule(name)) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def _prune_and_pack(tmp_path, family, overrides):
    """(pruned dir, packed dir, the packed manifest) of a tiny ``family`` model, dense but for ``overrides``
    (magnitude)."""
    model_dir = save_tiny_model(str(tmp_path / family), family)
    pruned, packed = str(tmp_path / "pruned"), str(tmp_path / "packed")
    rc, _ = _run(["prune", model_dir, "--out", pruned, "--pattern", "dense", "--method", "magnitude",
                  *(arg for o in overrides for arg in ("--override", o)), *FAST])
    assert rc == 0
    return pruned, packed, _pack(pruned, packed)


def _pack(pruned, packed, *pack_args):
    """`s3sparse pack` of ``pruned`` into ``packed``; its manifest."""
    rc, text = _run(["pack", pruned, "--out", packed, *pack_args])
    assert rc == 0, text
    with open(os.path.join(packed, MANIFEST_NAME)) as f:
        return json.load(f)


def test_column_patterns_outside_the_mlp_become_gathered_dense_layers(tmp_path):
    """A column pattern no MLP compaction covers (attention's o_proj on col-blocks, q_proj on columns) is kept
    as a smaller dense Linear over its kept input columns behind a gather (GatherLinear), not packed: the
    pruned model's outputs, half the bytes, and load_packed builds it back as such; --no-compact packs it."""
    from s3sparse.sparse import GatherLinear

    overrides = ["*.o_proj=col-blocks:16:0.5", "*.q_proj=columns:0.5"]
    pruned, packed, manifest = _prune_and_pack(tmp_path, "qwen3", overrides)
    layers = manifest["pack"]["layers"]
    assert layers and {layer["kind"] for layer in layers} == {"gathered"}, layers
    for layer in layers:
        assert layer["bytes_after"] < 0.52 * layer["bytes_before"], layer  # half the columns, + the index
        assert layer["max_abs_diff"] is not None and layer["max_abs_diff"] < 1e-5
    dense = transformers.AutoModelForCausalLM.from_pretrained(pruned).eval()
    loaded = load_packed(packed)
    for layer in layers:
        module = loaded.get_submodule(layer["name"])
        assert isinstance(module, GatherLinear) and module.index.numel() == module.in_features // 2, layer["name"]
        kept = dense.get_submodule(layer["name"]).weight.index_select(1, module.index)
        assert torch.equal(module.linear.weight, kept) and not bool(kept.eq(0).all(0).any()), layer["name"]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    manifest = _pack(pruned, str(tmp_path / "packed-no-compact"), "--no-compact")
    assert {layer["kind"] for layer in manifest["pack"]["layers"]} == {"packed"}


def test_gpt2_column_patterns_are_gathered_and_load_in_half_precision(tmp_path):
    """GPT-2's Conv1D layers (with biases) on column patterns become GatherLinears; load_packed casts their
    weights and biases to the dtype asked for and keeps the index an integer."""
    from s3sparse.sparse import GatherLinear

    overrides = ["*.attn.c_attn=columns:0.5", "*.attn.c_proj=col-blocks:16:0.5"]
    pruned, packed, manifest = _prune_and_pack(tmp_path, "gpt2", overrides)
    assert {layer["kind"] for layer in manifest["pack"]["layers"]} == {"gathered"}
    assert not any(name.endswith(".linear") for name in manifest["modules"])  # built by their GatherLinear's entry
    loaded = load_packed(packed, dtype=torch.float16)
    gathers = [m for m in loaded.modules() if isinstance(m, GatherLinear)]
    assert len(gathers) == 2 * loaded.config.n_layer
    for module in gathers:
        assert module.index.dtype == torch.int64 and module.linear.weight.dtype == torch.float16
        assert module.linear.bias is not None and module.linear.bias.dtype == torch.float16
    dense = transformers.AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float16).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), dense(ids).logits.float(), rtol=2e-2, atol=2e-2)


def test_column_patterns_inside_a_compacted_mlp_are_gathered_too():
    """An MLP of column patterns: down_proj's zero columns compact the MLP's channels (down_proj shrinks), then
    gate/up, compacted in their rows, still hold zero input columns: those are gathered. An output-channel
    pattern outside any MLP (q_proj, channels) is packed."""
    model = tiny_model("llama")
    calib = tiny_calibration(n_samples=4, seq_len=32)
    overrides = {"*.mlp.gate_proj": "columns:0.5", "*.mlp.up_proj": "columns:0.5", "*.mlp.down_proj": "columns:0.5",
                 "*.self_attn.q_proj": "channels:0.5"}
    report = prune_model(model, calib, pattern="dense", method="magnitude", progress=False, overrides=overrides)
    layer_patterns = {r.name: r.pattern for r in report.layers if r.status == "pruned"}
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    result = pack_model(model, layer_patterns)
    assert len(result.layers) == 4 * 2  # 2 blocks
    for layer in result.layers:
        kind = {"down_proj": "compacted", "q_proj": "packed"}.get(layer.name.split(".")[-1], "gathered")
        assert layer.kind == kind, layer
        if kind == "gathered":  # gate / up: half the rows, then half the columns
            assert "compacted to" in layer.note and layer.bytes_after < 0.3 * layer.bytes_before, layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_layers_are_packed(tmp_path):
    model = tiny_model("gpt2")
    calib = tiny_calibration(n_samples=4, seq_len=32)
    report = prune_model(model, calib, pattern="2:4", method="sparsegpt", progress=False)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    pack_model(model, {r.name: r.pattern for r in report.layers if r.status == "pruned"})
    assert isinstance(model.transformer.h[0].mlp.c_fc, PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_a_layer_that_does_not_obey_its_pattern_is_refused_and_nothing_is_swapped():
    from s3sparse.llm import UsageError

    model = tiny_model("qwen3")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with pytest.raises(UsageError, match="does not obey its pattern"):
        pack_model(model, {name: "2:4" for name in names})
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_bad_arguments_exit_2_with_one_line(pruned_dir, packed_dir, tmp_path, capsys):
    out, _ = packed_dir
    rc, _ = _run(["pack", pruned_dir, "--out", out])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    plain = save_tiny_model(str(tmp_path / "plain"))
    rc, _ = _run(["pack", plain, "--out", str(tmp_path / "o")])
    assert rc == 2 and "s3sparse.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    rc, _ = _run(["pack", plain, "--out", out])  # OUT exists, but the bad argument is what is reported
    err = capsys.readouterr().err
    assert rc == 2 and "has no s3sparse.json" in err and "already exists" not in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    rc, _ = _run(["pack", pruned_dir, "--out", str(mine), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "not written by s3sparse" in err and "--overwrite" in err and str(mine) in err
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    with pytest.raises(Exception, match="not a packed model directory"):
        load_packed(pruned_dir)
