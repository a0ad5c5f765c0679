"""Several GPUs: one layer's True OBS (and optionally a whole-model prune) timed on 1 and on N ranks.

Launched with torchrun, one process per GPU::

    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py \\
        --model-blocks 2 --out benchmarks/results/multi-gpu-h200x2.json
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu.py --quick --device cpu --out /tmp/mg.json  # gloo

The layer is ``data.synthetic_layer(M, K, N)`` (2560 × 9728, N = 8192 by default).
Each rank draws its share of the calibration row blocks and the partial Hessians
are summed with ``all_reduce``; the single-rank figures use the whole set drawn on
one rank (``synthetic_layer``'s H). Then:

* **1 rank**: rank 0 prunes every row (``process_group=None``) while the others wait;
* **N ranks**: every rank prunes its share of the row groups
  (``process_group=WORLD``), the rows are gathered; the time is rank 0's
  wall-clock from a barrier to the gathered weight (all ranks are reported).

Both are preceded by an untimed warm-up run (CUDA graphs, cuBLAS handles).
Reported: times, speed-up, each result's relative output error, the largest
relative output-error difference, masks that differ, and how far the all-reduced
H is from the single-rank one. ``--model-blocks B`` also prunes a random
Qwen3-shaped model of B blocks (hidden ``K``'s default 2560, intermediate 9728)
with ``prune_model`` on 1 and on N ranks, on random token ids.

On the lent H200 machines NVLink multicast must stay off: the script sets
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` unless they are already set. Rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# Before torch.distributed initialises NCCL (see the module docstring).
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from common import environment, exact_fp32, sync  # noqa: E402

from s3sparse.pruners import StructuredOBS, output_error, prune_sparsegpt  # noqa: E402
from s3sparse.pruners.sharding import split_evenly  # noqa: E402

ENV_DEFAULTS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu; each rank uses cuda:LOCAL_RANK")
    p.add_argument("-M", type=int, default=2560)
    p.add_argument("-K", type=int, default=9728)
    p.add_argument("-N", type=int, default=8192, help="calibration rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern", default="2:4", help="a pattern name of s3sparse.llm (2:4, 4:8, coupled-2:4, block16-rows)")
    p.add_argument("--method", default="true-obs", choices=["true-obs", "sparsegpt"])
    p.add_argument("--ng", type=int, default=None, help="True OBS scopes per batch (default: the pruner's)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each configuration (the median is reported)")
    p.add_argument("--model-blocks", type=int, default=0, help="also prune a random Qwen3-shaped model of this many blocks")
    p.add_argument("--model-hidden", type=int, default=2560)
    p.add_argument("--model-intermediate", type=int, default=9728)
    p.add_argument("--model-samples", type=int, default=32, help="calibration windows of the model prune")
    p.add_argument("--model-seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run): 64x256, N=2048, a 1-block 64-wide model")
    p.add_argument("--out", required=True, help="results JSON (written by rank 0)")
    args = p.parse_args(argv)
    if args.quick:
        args.M, args.K, args.N = 64, 256, 2048
        args.model_blocks = max(args.model_blocks, 1)
        args.model_hidden, args.model_intermediate, args.model_samples, args.model_seq_len = 64, 128, 6, 32
    for name in ("M", "K", "N", "repeat", "model_samples", "model_seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def init(device_arg: str):
    """(rank, world, device): the default group from torchrun's environment (NCCL on CUDA, gloo on the CPU)."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return dist.get_rank(), world, device
    return 0, 1, device


def barrier(world: int, device: torch.device) -> None:
    if world > 1:
        dist.barrier()
    sync(device)


def distributed_hessian(K: int, N: int, seed: int, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """H from this rank's contiguous share of the calibration row blocks, summed over the ranks."""
    n_blocks = -(-N // data.ROWS_PER_DRAW)
    bounds = split_evenly(n_blocks, world)
    H = torch.zeros(K, K, dtype=torch.float32, device=device)
    with exact_fp32():
        for x in data.calibration_inputs(K, N, seed, device, blocks=range(bounds[rank], bounds[rank + 1])):
            H.addmm_(x.T, x)
    if world > 1:
        dist.all_reduce(H)
    H.div_(N)
    return (H + H.T) / 2


def prune_layer(W0, H, pattern: str, method: str, ng, group) -> torch.Tensor:
    from s3sparse.llm import parse_pattern

    W = torch.nn.Parameter(W0.clone())
    scope, nnz = parse_pattern(pattern).build(W)
    if method == "sparsegpt":
        prune_sparsegpt(scope, H, nnz, process_group=group)
    else:
        StructuredOBS(scope, H).prune_true_obs(nnz, ng=ng, process_group=group)
    return W.detach()


def timed(fn, world: int, device: torch.device, repeat: int, alone: bool, rank: int, setup=None):
    """(median seconds on this rank, the last result): an untimed warm-up, then ``repeat`` timed runs
    of ``fn(setup())`` between barriers (``setup`` untimed). ``alone``: only rank 0 runs (the others
    wait at the barrier)."""
    idle = alone and rank != 0
    seconds, result = [], None
    for i in range(repeat + 1):
        prepared = setup() if setup is not None and not idle else None
        barrier(world, device)
        start = time.perf_counter()
        if not idle:
            result = fn(prepared)
        sync(device)
        elapsed = time.perf_counter() - start
        if i:
            seconds.append(elapsed)
    barrier(world, device)
    return sorted(seconds)[len(seconds) // 2], result


def gather_floats(value: float, world: int) -> list:
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def layer_benchmark(args, rank, world, device) -> dict:
    layer = data.synthetic_layer(args.M, args.K, args.N, seed=args.seed, device=device)
    H_dist = distributed_hessian(args.K, args.N, args.seed, rank, world, device)
    h_diff = float((H_dist - layer.H).abs().max() / layer.H.abs().max())
    group = dist.group.WORLD if world > 1 else None

    t1, W1 = timed(lambda _: prune_layer(layer.W, layer.H, args.pattern, args.method, args.ng, None), world, device,
                   args.repeat, alone=True, rank=rank)
    tn, Wn = timed(lambda _: prune_layer(layer.W, H_dist, args.pattern, args.method, args.ng, group), world, device,
                   args.repeat, alone=False, rank=rank)
    tn_all = gather_floats(tn, world)
    out = dict(M=args.M, K=args.K, N=args.N, pattern=args.pattern, method=args.method, ng=args.ng,
               hessian_max_relative_difference=h_diff, seconds_1_rank=None, seconds_n_ranks=max(tn_all),
               seconds_n_ranks_per_rank=tn_all, speedup=None, layer=layer.name)
    if rank == 0:
        e1 = output_error(W1, layer.W, layer.H)
        en = output_error(Wn, layer.W, layer.H)
        out.update(
            seconds_1_rank=t1,
            speedup=t1 / max(tn_all),
            error_1_rank=e1,
            error_n_ranks=en,
            error_relative_difference=abs(en - e1) / e1,
            masks_differing=int(((W1 == 0) != (Wn == 0)).sum()),
            weights_max_relative_difference=float((W1 - Wn).abs().max() / W1.abs().max()),
        )
    return out


def model_benchmark(args, rank, world, device) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from s3sparse.llm import prune_model

    heads = max(1, args.model_hidden // 128)
    config = Qwen3Config(vocab_size=4096, hidden_size=args.model_hidden, intermediate_size=args.model_intermediate,
                         num_hidden_layers=args.model_blocks, num_attention_heads=heads * 2, num_key_value_heads=heads,
                         head_dim=64, max_position_embeddings=max(4096, args.model_seq_len), tie_word_embeddings=False)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.model_samples, args.model_seq_len), generator=g)
    options = {"ng": args.ng} if args.ng and args.method == "true-obs" else None

    def build():
        torch.manual_seed(args.seed)
        return Qwen3ForCausalLM(config).eval()

    def run(model, group):
        report = prune_model(model, ids, "2:4", args.method, method_options=options, device=device, progress=False,
                             process_group=group)
        return report.to_dict()

    group = dist.group.WORLD if world > 1 else None
    t1, r1 = timed(lambda model: run(model, None), world, device, 1, alone=True, rank=rank, setup=build)
    tn, rn = timed(lambda model: run(model, group), world, device, 1, alone=False, rank=rank, setup=build)
    out = dict(blocks=args.model_blocks, hidden=args.model_hidden, intermediate=args.model_intermediate,
               samples=args.model_samples, seq_len=args.model_seq_len, method=args.method,
               seconds_n_ranks=max(gather_floats(tn, world)))
    if rank == 0:
        diffs = [abs(a["error"] - b["error"]) / a["error"] for a, b in zip(r1["layers"], rn["layers"]) if a["error"]]
        out.update(seconds_1_rank=t1, speedup=t1 / out["seconds_n_ranks"], layers=len(r1["layers"]),
                   mean_error_1_rank=sum(a["error"] for a in r1["layers"]) / len(r1["layers"]),
                   mean_error_n_ranks=sum(b["error"] for b in rn["layers"]) / len(rn["layers"]),
                   layer_error_max_relative_difference=max(diffs) if diffs else None)
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = init(args.device)
    try:
        results = {"layer": layer_benchmark(args, rank, world, device)}
        if args.model_blocks:
            results["model"] = model_benchmark(args, rank, world, device)
        if rank == 0:
            meta = environment(device)
            meta.update(world_size=world, backend=dist.get_backend() if world > 1 else None,
                        env={name: os.environ.get(name) for name in ENV_DEFAULTS}, args=vars(args))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
            layer = results["layer"]
            print(f"{args.method} {args.pattern} {args.M}x{args.K} on {world} rank(s) of {meta['device']}: "
                  f"1 rank {layer['seconds_1_rank']:.3f} s, {world} ranks {layer['seconds_n_ranks']:.3f} s "
                  f"(x{layer['speedup']:.2f}); output error {layer['error_1_rank']:.4f} vs {layer['error_n_ranks']:.4f} "
                  f"(relative difference {layer['error_relative_difference']:.2e}, {layer['masks_differing']} masks differ)")
            if "model" in results:
                m = results["model"]
                print(f"model of {m['blocks']} block(s): 1 rank {m['seconds_1_rank']:.2f} s, {world} ranks "
                      f"{m['seconds_n_ranks']:.2f} s (x{m['speedup']:.2f})")
            print(f"wrote {args.out}")
        # Every rank reaches the end before any tears the group down (rank 1
        # destroying gloo while rank 0 still wrote the JSON aborted it once in CI).
        barrier(world, device)
    finally:
        # gloo (the CPU): no teardown of the group at all. Its socket threads can see a peer close
        # and abort the process (SIGABRT), which happened twice in CI after the results were
        # written, once even after the final barrier; the script leaves through os._exit below.
        if world > 1 and device.type == "cuda":
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # (no interpreter teardown under torchrun: see the end of main)
    sys.exit(code)
