"""Whole-model decode step: a random Qwen3-0.6B-shaped model pruned 2:4 in every block Linear, packed vs dense.

    python benchmarks/packed_model.py --device cuda --out /tmp/model.json   # 28 layers, fp16, about a minute
    python benchmarks/packed_model.py --device cuda --layers 4              # a shallower model
    python benchmarks/packed_model.py --quick                               # CPU smoke run, a tiny config
    python benchmarks/packed_model.py --device cuda --fuse --compile        # + both with q|k|v, gate|up stacked

The model is ``transformers.Qwen3ForCausalLM`` built from a ``Qwen3Config`` of Qwen3-0.6B's shape
(hidden 1024, MLP 3072, 28 layers, 16 query heads and 8 KV heads of 128, vocabulary 151936, tied
embeddings) with random weights (the config's initialisation), in fp16 on the device. Every block
Linear (q, k, v, o, gate, up, down) is magnitude-pruned to ``--pattern`` (default 2:4;
``scope.hard_threshold``); that is the dense model. A copy packed by ``s3sparse.llm.pack_model``
(each of those Linears becomes a ``PackedLinear``) is the packed model. The embedding, the norms
and the LM head (tied to the embedding) stay dense in both.

What is timed: one decode step at batch 1 — one new token at position P after a prefix of P tokens
(``--prefix``, default 512) whose keys and values sit in a preallocated KV cache: the embedding
lookup, every decoder layer (RMSNorm, q/k/v projections, q/k RMSNorm, rotary embedding, the cache
write at position P, SDPA over the P + 1 cached positions, o projection, the MLP, residuals), the
final norm and the LM head (logits of the new token). The step is written here from the model's
own modules (this file, ``DecodeStep``), not through ``model.forward``: the model's forward builds
its attention mask on the host, which a CUDA graph cannot hold, and its cache API differs between
transformers versions. The dense step is checked against ``model.forward`` on the whole sequence
(``step_vs_model_rel_err``), so it computes what the model computes.

Two timings, as in ``benchmarks/packed.py``:

* ``graph`` (CUDA only) — GPU time per step: several steps captured in one CUDA graph (after a
  warm-up outside the capture), replayed ``--repeat`` times, CUDA events around each replay.
* ``eager`` — wall time per step of a plain Python loop of steps, synchronised at the end.

Reported: seconds per step and tokens/s of each model, the packed model's speedup, the bytes of
weights a step reads (all parameters and buffers; the tied embedding once, read whole by the LM
head) plus the KV cache, that over the step time as GB/s and as a fraction of the device-to-device
copy bandwidth measured in the same run, and the checks: the packed step's logits against the
dense step's (relative error, same greedy token), the dense step against ``model.forward``.
JSON (device, torch and transformers versions, git commit, config, every figure) goes to ``--out``
(default ``benchmarks/results/packed-model-<device>[-quick].json``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (TINY_QWEN3, copy_bandwidth, environment, pick_calls, sync, time_eager, time_graph,  # noqa: E402
                    warm_up)

from s3sparse.llm import pack_model, parse_pattern  # noqa: E402
from s3sparse.sparse import fuse_siblings  # noqa: E402

# Qwen3-0.6B's shape (its config.json), random weights.
QWEN3_0_6B = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QUICK = TINY_QWEN3
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Largest accepted ‖logits − logits_ref‖ / ‖logits_ref‖: the packed step against the dense step, and the
# dense step against model.forward (another SDPA kernel, another summation order, through every layer).
CHECK_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}
GRAPH_TARGET_S, EAGER_TARGET_S, MAX_STEPS = 20e-3, 50e-3, 20


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    """Batch-1 decoding of a Qwen3 model with a preallocated KV cache, from the model's modules.

    ``prefill(ids)`` runs the prefix (1, P) and fills cache positions 0..P-1; then every ``step()``
    runs ``token`` (a (1, 1) tensor, set in place) at position P and returns its logits (1, vocab).
    A step writes cache position P and reads positions 0..P, so repeated steps compute the same
    thing: the step can be captured in a CUDA graph and replayed (it allocates nothing on the host
    side, reads no device value on the host, and every shape is fixed).
    """

    def __init__(self, model: nn.Module, prefix_len: int):
        self.model, self.prefix_len = model, prefix_len
        config = model.config
        weight = model.lm_head.weight
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, 1, config.num_key_value_heads, prefix_len + 1, self.head_dim)
        self.keys = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.values = torch.zeros_like(self.keys)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
        self.position = torch.full((1,), prefix_len, dtype=torch.long, device=weight.device)
        self._decode = self._decode_eager

    def compile(self) -> None:
        """Run ``step`` through ``torch.compile(fullgraph=True)`` (inductor fuses the norms, the rotary
        embedding and the other small kernels around the Linears; the packed op enters as one call).
        The packed layers' tables are checked first, so compiled calls launch without a host sync."""
        for module in self.model.modules():
            if hasattr(module, "check_tables"):
                module.check_tables()
        self._decode = torch.compile(self._decode_eager, fullgraph=True, dynamic=False)

    def _decode_eager(self) -> torch.Tensor:
        return self._forward(self.token, self.position, self.prefix_len + 1)

    def _attention(self, i: int, attn: nn.Module, h: torch.Tensor, cos, sin, positions, length: int) -> torch.Tensor:
        B, T, _ = h.shape
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)  # (fused: slices of one stacked output)
        q = attn.q_norm(q.reshape(B, T, -1, self.head_dim)).transpose(1, 2)
        k = attn.k_norm(k.reshape(B, T, -1, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.keys[i].index_copy_(2, positions, k)
        self.values[i].index_copy_(2, positions, v)
        # A prefill attends causally (kv length = q length); a decode step's one query sees every cached position.
        # (enable_gqa, not the query heads of a KV head folded into its queries: on an H100 the folded call took
        # cuDNN's sm90 kernel, 12 us a layer, against 6 us: benchmarks/results/packed-model-profile-h100-*.txt.)
        out = F.scaled_dot_product_attention(q, self.keys[i, :, :, :length], self.values[i, :, :, :length],
                                             is_causal=T > 1, scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        inner = self.model.model
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions.view(1, -1))
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin, positions, length)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h[:, -1]))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if tuple(ids.shape) != (1, self.prefix_len):
            raise ValueError(f"the prefix must be (1, {self.prefix_len}), got {tuple(ids.shape)}")
        positions = torch.arange(self.prefix_len, device=ids.device)
        return self._forward(ids, positions, self.prefix_len)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        return self._decode()


def build_model(config_kwargs: dict, layers: Optional[int], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random ``Qwen3ForCausalLM`` of that shape, built on ``device`` in ``dtype``, in eval mode."""
    import transformers

    kwargs = dict(config_kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = transformers.Qwen3Config(**kwargs)
    config._attn_implementation = "sdpa"  # for the reference model.forward
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def prune_block_linears(model: nn.Module, pattern: str) -> dict:
    """Magnitude-prune every block Linear to ``pattern`` in place; ``{name: pattern}`` for ``pack_model``."""
    choice = parse_pattern(pattern)
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS and ".layers." in f".{name}":
            scope, nnz = choice.build(module.weight)
            scope.hard_threshold(nnz=nnz)
            names[name] = pattern
    return names


def _fused_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its q|k|v and gate|up projections stacked (``fuse_siblings``)."""
    fused = copy.deepcopy(model)
    report = fuse_siblings(fused)
    if report.skipped:
        print(report)
    return fused


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, shared ones (the tied embedding) once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def time_step(step: DecodeStep, device: torch.device, repeat: int) -> dict:
    """Seconds per decode step, eager and (CUDA) by graph replay; tokens/s at batch 1."""
    fns = [step.step]
    warm_up(fns, device)
    out = {}
    n = pick_calls(fns, device, EAGER_TARGET_S, MAX_STEPS)
    out["eager_s"] = time_eager(fns, device, n, repeat)["seconds"]
    out["eager_steps"] = n
    if device.type == "cuda":
        n = pick_calls(fns, device, GRAPH_TARGET_S, MAX_STEPS)
        try:
            out["graph_s"] = time_graph(fns, device, n, repeat)["seconds"]
            out["graph_steps"] = n
        except Exception as exc:  # noqa: BLE001 - keep the eager figure, say why there is no graph one
            out["graph_status"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=4)
            sync(device)
    for mode in ("graph", "eager"):
        if f"{mode}_s" in out:
            out[f"{mode}_tokens_per_s"] = 1.0 / out[f"{mode}_s"]
    return out


def profile_step(step: DecodeStep, device: torch.device, steps: int = 5) -> str:
    """Time a step by kernel (CUDA: GPU kernels by device time) or by op (CPU: self CPU time): ``steps``
    eager steps under torch.profiler, the top 25."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step.step()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step.step()
        sync(device)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=lambda e: -spent(e))
    what = "GPU kernels" if cuda else "CPU ops (self time)"
    lines = [f"{what}: {sum(spent(e) for e in events) / steps:.1f} us a step in "
             f"{sum(e.count for e in events) // steps} calls (eager steps; {steps} steps averaged)",
             f"{'us/step':>9} {'calls':>6}  {'kernel' if cuda else 'op'}"]
    lines += [f"{spent(e) / steps:9.1f} {e.count // steps:6d}  {e.key[:110]}" for e in events[:25]]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    ap.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default float16; float32 with --quick")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 28, Qwen3-0.6B's; 2 with --quick)")
    ap.add_argument("--pattern", default="2:4", help="pattern of every block Linear (default 2:4)")
    ap.add_argument("--prefix", type=int, default=None, help="tokens in the KV cache before the timed one (default "
                    "512; 16 with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="timed samples (default 10; 3 with --quick)")
    ap.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile, inductor, "
                    "fullgraph) before timing it, dense and packed alike")
    ap.add_argument("--fuse", action="store_true", help="also time copies of both models with q|k|v and gate|up "
                    "stacked into one layer each by s3sparse.sparse.fuse_siblings (dense-fused, packed-fused): what "
                    "that fusion adds, apart from packing")
    ap.add_argument("--profile", default=None, help="also write here each model's time per step: by kernel on a GPU, "
                    "by op on the CPU (torch.profiler over a few eager steps, sorted by time)")
    ap.add_argument("--quick", action="store_true", help="a tiny Qwen3 (hidden 64, 2 layers, vocabulary 512) on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("float32" if args.quick else "float16")]
    prefix = args.prefix or (16 if args.quick else 512)
    repeat = args.repeat or (3 if args.quick else 10)
    started = time.perf_counter()
    torch.manual_seed(0)

    import transformers

    env = environment(device)
    env["transformers"] = transformers.__version__
    print(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, "
          f"{str(dtype).replace('torch.', '')}")
    copy_bps = copy_bandwidth(device, (1024 if device.type == "cuda" else 32) * 2**20, repeat)

    dense = build_model(QUICK if args.quick else QWEN3_0_6B, args.layers, device, dtype)
    config = dense.config
    layer_patterns = prune_block_linears(dense, args.pattern)
    print(f"Qwen3 {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}: "
          f"{len(layer_patterns)} block Linears pruned to {args.pattern}; prefix {prefix} tokens; "
          f"copy {copy_bps / 1e9:.0f} GB/s")
    failures: List[dict] = []
    packed = copy.deepcopy(dense)
    try:
        report = pack_model(packed, layer_patterns)
        pack_info = dict(layers=len(report.layers), bytes_before=report.bytes_before, bytes_after=report.bytes_after,
                         seconds=report.seconds)
    except Exception as exc:  # noqa: BLE001 - the dense figures are still worth having
        failures.append(dict(stage="pack_model", detail=f"{type(exc).__name__}: {exc}"))
        traceback.print_exc(limit=4)
        packed, pack_info = None, None

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, prefix + 1), generator=generator).to(device)
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * (prefix + 1) * \
        config.head_dim * torch.finfo(dtype).bits // 8
    results, logits, profiles = {}, {}, {}
    variants = [("dense", dense), ("packed", packed)]
    if args.fuse:
        variants += [(f"{name}-fused", _fused_copy(model)) for name, model in variants if model is not None]
    for name, model in variants:
        if model is None:
            continue
        step = None
        try:
            step = DecodeStep(model, prefix)
            step.prefill(ids[:, :prefix])
            step.token.copy_(ids[:, prefix:])
            if args.compile:
                step.compile()
            logits[name] = step.step().clone()
            res = dict(weight_bytes=state_bytes(model), kv_cache_bytes=kv_bytes)
            res.update(time_step(step, device, repeat))
            if args.profile:
                profiles[name] = profile_step(step, device)
            for mode in ("graph", "eager"):
                if f"{mode}_s" in res:
                    bps = (res["weight_bytes"] + kv_bytes) / res[f"{mode}_s"]
                    res[f"{mode}_GB/s"], res[f"{mode}_of_copy"] = bps / 1e9, bps / copy_bps
            results[name] = res
            print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, float)), flush=True)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not hide the other's figures
            failures.append(dict(stage=name, detail=f"{type(exc).__name__}: {exc}"))
            traceback.print_exc(limit=4)
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    checks = {}
    with torch.no_grad():
        want = dense(ids).logits[:, -1]
    if "dense" in logits:
        checks["step_vs_model_rel_err"] = rel_err(logits["dense"], want)
    for name in ("packed", "dense-fused", "packed-fused"):  # each against the dense step: error, greedy token
        if "dense" in logits and name in logits:
            checks[f"{name}_vs_dense_rel_err"] = rel_err(logits[name], logits["dense"])
            checks["same_greedy_token"] = checks.get("same_greedy_token", True) and \
                bool(logits[name].argmax(-1).eq(logits["dense"].argmax(-1)).all())
    checks["tolerance"] = CHECK_TOL[dtype]
    checks["ok"] = all(checks.get(k, math.inf) <= CHECK_TOL[dtype]
                       for k in ("step_vs_model_rel_err", "packed_vs_dense_rel_err")) and checks.get("same_greedy_token", False)
    checks["ok"] &= all(v <= CHECK_TOL[dtype] for k, v in checks.items() if k.endswith("_vs_dense_rel_err"))

    print(f"{'model':<12} {'timing':<6} {'ms/step':>8} {'tokens/s':>9} {'×dense':>7} {'GB/s':>6} {'of copy':>7} {'MB read':>8}")
    for mode in ("graph", "eager"):
        for name, res in results.items():
            if f"{mode}_s" not in res:
                continue
            speedup = ""
            if name != "dense" and f"{mode}_s" in results.get("dense", {}):
                res[f"{mode}_speedup"] = results["dense"][f"{mode}_s"] / res[f"{mode}_s"]
                speedup = f"{res[f'{mode}_speedup']:7.2f}"
            print(f"{name:<12} {mode:<6} {res[f'{mode}_s'] * 1e3:8.3f} {res[f'{mode}_tokens_per_s']:9.1f} {speedup:>7} "
                  f"{res[f'{mode}_GB/s']:6.0f} {res[f'{mode}_of_copy']:7.0%} "
                  f"{(res['weight_bytes'] + kv_bytes) / 1e6:8.1f}")
    print("checks: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items()))
    if not checks["ok"]:
        print("CHECK FAILED: the packed model's logits are not the pruned dense model's (see above)")
    for name, res in results.items():
        if "graph_status" in res:
            print(f"{name}: no CUDA-graph timing: {res['graph_status'].splitlines()[0]}")
    for failure in failures:
        print(f"failed: {failure['stage']}: {failure['detail'].splitlines()[0]}")

    if args.profile:
        Path(args.profile).write_text("\n\n".join(f"# {name}\n{table}" for name, table in profiles.items()))
        print(f"wrote {args.profile}")
    out = Path(args.out) if args.out else \
        HERE / "results" / f"packed-model-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark="packed_model", **env, dtype=str(dtype).replace("torch.", ""), pattern=args.pattern,
                prefix=prefix, batch=1, repeat=repeat, compiled=args.compile, fused=args.fuse, **{"copy_GB/s": copy_bps / 1e9},
                config={k: v for k, v in config.to_dict().items() if k in QWEN3_0_6B or k == "rope_parameters"},
                pruned_linears=len(layer_patterns), pack=pack_info,
                timed="one decode step at batch 1 (DecodeStep): embedding, every decoder layer with a preallocated "
                      "KV cache of prefix + 1 positions, final norm, LM head",
                timings={"graph": "GPU time per step: CUDA events around replays of a CUDA graph of several steps",
                         "eager": "wall time per step of a plain loop of steps, synchronised at the end"},
                seconds=time.perf_counter() - started)
    result = dict(meta=meta, results=results, checks=checks, failures=failures)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{meta['seconds']:.0f} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
