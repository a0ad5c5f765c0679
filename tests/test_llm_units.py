"""The model pipeline's small parts: pattern and method names, recipes, calibration windows, report, save."""

from __future__ import annotations

import json
import os

import pytest
import torch

from s3sparse.llm import UsageError, parse_method, parse_pattern
from s3sparse.llm.calibration import calibration_windows, read_texts
from s3sparse.llm.recipe import Recipe, load_recipe_file, name_matches, parse_override
from s3sparse.llm.report import LayerReport, PruneReport, count_redone_rows
from s3sparse.llm.save import check_output_dir, save_pruned_model


# ------------------------------------------------------------------ patterns
@pytest.mark.parametrize(
    "name, canonical, blocks_per_scope, nnz",
    [
        ("2:4", "2:4", 4, 2),
        ("24", "2:4", 4, 2),
        ("4:8", "4:8", 4, 2),
        ("1:4", "1:4", 4, 1),
        ("nm:4:8", "nm:4:8", 8, 4),
        ("nm-blocks:1:2:4", "nm-blocks:1:2:4", 2, 1),
        ("coupled-2:4", "coupled-2:4", 4, 2),
        ("coupled24", "coupled-2:4", 4, 2),
        ("block16-rows", "block16-rows", 2, 1),
        ("block8-rows4", "block8-rows4", 2, 1),
        ("channels:0.25", "channels:0.25", 32, 24),
        ("columns:0.5", "columns:0.5", 64, 32),
        ("col-blocks:16:0.5", "col-blocks:16:0.5", 4, 2),
    ],
)
def test_pattern_names(name, canonical, blocks_per_scope, nnz):
    choice = parse_pattern(name)
    assert choice.name == canonical and not choice.is_dense
    scope, keep = choice.build(torch.empty(32, 64, device="meta"))
    assert scope.numblk_per_scope() == blocks_per_scope and keep == nnz


def test_dense_pattern_and_holds():
    assert parse_pattern("dense").is_dense and parse_pattern("none").is_dense
    w = torch.randn(8, 16)
    choice = parse_pattern("2:4")
    assert not choice.holds(w)
    scope, nnz = choice.build(w)
    scope.hard_threshold(nnz=nnz)
    assert choice.holds(w)
    w[0, :4] = 1.0
    assert not choice.holds(w)


@pytest.mark.parametrize("bad", ["bogus", "5:4", "0:4", "channels:1.5", "", "2:4:8:16:32"])
def test_bad_pattern_names(bad):
    with pytest.raises(UsageError):
        parse_pattern(bad)


def test_pattern_shape_error_says_why():
    with pytest.raises(ValueError, match="K=20 is not a multiple of 16"):
        parse_pattern("coupled-2:4").build(torch.empty(8, 20, device="meta"))


# ------------------------------------------------------------------ methods
def test_method_names_and_options():
    m = parse_method("true-obs", {"ng": "32", "scoring": "joint"})
    assert m.name == "true-obs" and m.options["ng"] == 32 and m.options["scoring"] == "joint" and m.options["damp"] == 1e-4
    assert m.method.options.ng == 32 and m.enumerates_subsets and m.shards_rows
    assert parse_method("sparsegpt").options == {"blocksize": 128, "damp": 0.01, "refine": 0}
    assert parse_method("true-obs", {"c_dtype": "bf16"}).method.options.c_dtype == torch.bfloat16
    assert parse_method("true-obs").options["ng"] is None  # 64, or 1 on row-coupled patterns
    assert "n_splits" not in parse_method("obs-full").options and parse_method("obs-split").options["n_splits"] == 4
    assert parse_method("true_obs").name == "true-obs"
    assert parse_method(m, {"ng": 16}).options["scoring"] == "joint"
    assert not parse_method("magnitude").uses_hessian


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("nope", None, "unknown method 'nope'"),
        ("sparsegpt", {"ng": 3}, "has no option ng"),
        ("true-obs", {"order": "random"}, "not one of"),
        ("true-obs", {"ng": 0}, ">= 1"),
        ("obs-full", {"damp": "x"}, "must be a number"),
        ("magnitude", {"damp": 1}, "takes no options"),
        ("sparsegpt", {"damp": "inf"}, "finite"),
    ],
)
def test_bad_methods(name, options, message):
    with pytest.raises(UsageError, match=message):
        parse_method(name, options)


# ------------------------------------------------------------------ recipes
def test_name_matching():
    assert name_matches("model.layers.3.mlp.down_proj", "*.down_proj")
    assert name_matches("model.layers.3.mlp.down_proj", "down_proj")
    assert name_matches("model.layers.3.mlp.down_proj", "mlp.down_proj")
    assert name_matches("lm_head", "lm_head")
    assert not name_matches("model.layers.3.mlp.down_proj", "up_proj")
    assert not name_matches("model.layers.3.mlp.xdown_proj", "down_proj")


def test_recipe_rules_apply_in_order_and_keep_options():
    recipe = Recipe.create(
        "2:4", "true-obs", {"ng": 16},
        overrides=[{"match": "*.mlp.*", "pattern": "4:8"}, {"match": "*.down_proj", "method": "sparsegpt"},
                   {"match": "*.up_proj", "options": {"ng": 8}}, {"match": "model.layers.0.*", "pattern": "dense"}],
        skip=["lm_head", "k_proj"],
    )
    plan = recipe.plan_for("model.layers.1.mlp.down_proj")
    assert plan.pattern.name == "4:8" and plan.method.name == "sparsegpt"
    plan = recipe.plan_for("model.layers.1.mlp.up_proj")
    assert plan.pattern.name == "4:8" and plan.method.name == "true-obs" and plan.method.options["ng"] == 8
    assert recipe.plan_for("model.layers.1.self_attn.q_proj").method.options["ng"] == 16
    assert recipe.plan_for("model.layers.0.mlp.up_proj").pattern.is_dense
    assert recipe.plan_for("model.layers.1.self_attn.k_proj").skipped
    assert recipe.to_dict()["overrides"][1] == {"match": "*.down_proj", "method": "sparsegpt"}


def test_recipe_refuses_bad_names_up_front():
    with pytest.raises(UsageError, match="unknown pattern"):
        Recipe.create(overrides={"*.down_proj": "nonsense"})
    with pytest.raises(UsageError, match="unknown key"):
        Recipe.create(overrides=[{"match": "x", "patern": "2:4"}])


def test_parse_override():
    rule = parse_override("*.mlp.*=2:4,method=true-obs,ng=32,damp=1e-3")
    assert (rule.match, rule.pattern, rule.method, rule.options) == ("*.mlp.*", "2:4", "true-obs", {"ng": 32, "damp": 1e-3})
    assert parse_override("*.o_proj=method=obd").pattern is None
    with pytest.raises(UsageError):
        parse_override("no-equals-sign")


def test_recipe_yaml_reads_2_4_as_a_pattern_not_base_60(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    path.write_text("pattern: 2:4\nmethod: true-obs\noptions: {damp: 1e-4, ng: 32}\n"
                    "overrides:\n  '*.down_proj': 4:8\ncalibration: {source: pydoc, n_samples: 4}\n")
    kwargs, calibration = load_recipe_file(str(path))
    assert kwargs["pattern"] == "2:4" and kwargs["overrides"] == {"*.down_proj": "4:8"}
    assert kwargs["method_options"] == {"damp": 1e-4, "ng": 32} and calibration == {"source": "pydoc", "n_samples": 4}
    recipe = Recipe.create(**kwargs)
    assert recipe.plan_for("a.down_proj").pattern.name == "4:8"


def test_recipe_json_and_bad_files(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"pattern": "4:8", "skip": "lm_head"}))
    kwargs, _ = load_recipe_file(str(path))
    assert kwargs == {"pattern": "4:8", "skip": ["lm_head"]}
    path.write_text(json.dumps({"patern": "4:8"}))
    with pytest.raises(UsageError, match="unknown key"):
        load_recipe_file(str(path))
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe_file(str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------ calibration
def test_pydoc_sources_split_without_overlap():
    calib, heldout, everything = read_texts("pydoc:calib"), read_texts("pydoc:heldout"), read_texts("pydoc")
    assert len(calib) + len(heldout) == len(everything) and not set(calib) & set(heldout)


def test_text_and_jsonl_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond one\n\n\n")
    assert read_texts(str(txt)) == ["first paragraph\nstill first", "second one"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_texts(str(jsonl)) == ["one", "two"]
    jsonl.write_text('{"content": "one"}\n')
    with pytest.raises(UsageError, match="no 'text' field"):
        read_texts(str(jsonl))
    assert read_texts(str(jsonl), text_field="content") == ["one"]
    with pytest.raises(UsageError, match="does not exist"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UsageError, match="no text"):
        read_texts(str(tmp_path / "empty.txt"))


def test_saved_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha beta", "", "gamma"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(str(tmp_path / "ds")) == ["alpha beta", "gamma"]


def test_windows_are_seeded_and_framed():
    ids = list(range(1000))
    a = calibration_windows(ids, 6, 10, seed=1, prefix=[-1], suffix=[-2])
    b = calibration_windows(ids, 6, 10, seed=1, prefix=[-1], suffix=[-2])
    c = calibration_windows(ids, 6, 10, seed=2, prefix=[-1], suffix=[-2])
    assert a.shape == (6, 10) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == -1).all() and (a[:, -1] == -2).all()
    assert ((a[:, 2:-1] - a[:, 1:-2]) == 1).all()  # contiguous text
    with pytest.raises(UsageError, match="fewer than one window"):
        calibration_windows(list(range(5)), 2, 10)
    with pytest.raises(UsageError, match="n_samples"):
        calibration_windows(ids, 0, 10)


# ------------------------------------------------------------------ report
def test_redone_rows_are_counted_from_warnings():
    messages = [
        "prune_true_obs: 12 of 256 rows hit a non-positive-definite sub-problem and were redone with fp32 C",
        "StructuredOBS's H + damp*I was not positive definite; damping raised to 0.1 (1 retries)",
        "some rows were redone",
    ]
    assert count_redone_rows(messages) == 13


def test_report_table_and_summary():
    report = PruneReport(model_parameters=100, model_zeros=10)
    report.layers = [
        LayerReport("a.q", (4, 8), "2:4", "sparsegpt", error=0.25, seconds=1.5, sparsity=0.5, pattern_holds=True),
        LayerReport("a.k", (4, 8), "2:4", "true-obs", error=0.2, fp32_redos=3, sparsity=0.5, damping_raised=True,
                    dead_inputs=2, rank_deficient=True, pattern_holds=True),
        LayerReport("lm_head", (8, 4), "2:4", "sparsegpt", status="skipped"),
    ]
    table = report.layer_table()
    assert "out err" in table and "0.2500" in table and "damping raised, 2 dead inputs" in table and "skipped" in table
    summary = report.sparsity_summary()
    assert summary["pruned_layers"] == 2 and summary["pruned_layer_sparsity"] == 0.5 and summary["fp32_redos"] == 3
    assert "whole model: 10.00% of 100 parameters" in report.sparsity_report()
    json.dumps(report.to_dict())


# ------------------------------------------------------------------ save
class _FakeModel:
    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, path):
        with open(os.path.join(path, "model.safetensors"), "w") as f:
            f.write("weights")
        if self.fail:
            raise KeyboardInterrupt


def test_save_is_atomic(tmp_path):
    source = tmp_path / "src"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "1_Pooling" / "config.json").write_text("{}")
    (source / "model.safetensors").write_text("dense")
    (source / "modules.json").write_text("[]")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        save_pruned_model(_FakeModel(fail=True), None, str(out), {"a": 1}, model_dir=str(source))
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["src"]
    save_pruned_model(_FakeModel(), None, str(out), {"a": 1}, model_dir=str(source))
    assert (out / "model.safetensors").read_text() == "weights"
    assert (out / "1_Pooling" / "config.json").exists() and (out / "modules.json").exists()
    assert json.loads((out / "s3sparse.json").read_text()) == {"a": 1}
    assert (source / "model.safetensors").read_text() == "dense"
    with pytest.raises(UsageError, match="already exists"):
        save_pruned_model(_FakeModel(), None, str(out), {}, model_dir=str(source))
    save_pruned_model(_FakeModel(), None, str(out), {"b": 2}, model_dir=str(source), overwrite=True)
    assert json.loads((out / "s3sparse.json").read_text()) == {"b": 2}
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_output_dir_checks(tmp_path):
    with pytest.raises(UsageError, match="overlap"):
        check_output_dir(str(tmp_path), str(tmp_path / "model"))
    with pytest.raises(UsageError, match="overlap"):
        check_output_dir(str(tmp_path / "model" / "pruned"), str(tmp_path / "model"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_output_dir(str(tmp_path / "file"), None, overwrite=True)
