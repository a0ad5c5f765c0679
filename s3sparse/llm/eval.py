"""Evaluating a (pruned) model on held-out text.

* Causal language models: **perplexity** — ``exp`` of the mean next-token loss over
  non-overlapping windows of ``seq_len`` tokens of the text (the first
  ``n_samples`` windows).
* Encoders (BERT-like): **mean cosine similarity** of mean-pooled embeddings
  (last hidden state averaged over the attention mask, as sentence-transformers
  does for all-MiniLM-L6-v2) between the model and the dense model, over up to
  ``n_samples`` paragraphs of the text (seeded sample), each truncated to
  ``seq_len`` tokens.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .calibration import _paragraphs, special_token_frame, tokenize_texts
from .progress import progress_bar

__all__ = ["perplexity", "perplexity_windows", "mean_pooled_embeddings", "embedding_similarity", "heldout_paragraphs"]


def perplexity_windows(tokenizer, texts: Sequence[str], seq_len: int, n_samples: int) -> Tensor:
    """The first ``n_samples`` non-overlapping windows of ``seq_len`` tokens of ``texts``: ``(n, seq_len)``."""
    prefix, suffix = special_token_frame(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    ids = tokenize_texts(tokenizer, texts)
    count = min(int(n_samples), len(ids) // body)
    if count < 1:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.as_tensor(ids[: count * body], dtype=torch.long).view(count, body)
    parts = [torch.as_tensor(prefix, dtype=torch.long).expand(count, -1)] if prefix else []
    parts.append(windows)
    if suffix:
        parts.append(torch.as_tensor(suffix, dtype=torch.long).expand(count, -1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Tensor, batch_size: int = 4, device: Optional[torch.device] = None,
    progress: bool = False, desc: str = "perplexity",
) -> float:
    """Perplexity of a causal LM on ``windows`` (``(n, seq_len)`` token ids), every next token counted once.

    ``progress``: a bar labelled ``desc`` on stderr, one step per window.
    """
    device = device or next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    bar = progress_bar(progress, int(windows.shape[0]), desc, "window")
    for batch in windows.split(max(1, int(batch_size))):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += batch[:, 1:].numel()
        bar.update(int(batch.shape[0]))
    bar.close()
    return math.exp(total_loss / total_tokens)


def heldout_paragraphs(texts: Sequence[str], n_samples: int, seed: int = 0, min_chars: int = 40) -> List[str]:
    """Up to ``n_samples`` paragraphs (of at least ``min_chars`` characters) of ``texts``, a seeded sample in text order."""
    paragraphs = [p for text in texts for p in _paragraphs(text) if len(p) >= min_chars]
    if len(paragraphs) > n_samples:
        chosen = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(int(seed)))[: int(n_samples)]
        paragraphs = [paragraphs[i] for i in sorted(chosen.tolist())]
    if not paragraphs:
        raise ValueError("the evaluation text has no paragraphs to embed")
    return paragraphs


@torch.no_grad()
def mean_pooled_embeddings(
    model: nn.Module, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 16, device=None,
    progress: bool = False, desc: str = "embeddings",
) -> Tensor:
    """Mean-pooled last hidden states of ``texts`` (truncated to ``seq_len`` tokens): ``(len(texts), hidden)``, fp32.

    ``progress``: a bar labelled ``desc`` on stderr, one step per text.
    """
    device = device or next(model.parameters()).device
    out = []
    bar = progress_bar(progress, len(texts), desc, "text")
    for start in range(0, len(texts), max(1, int(batch_size))):
        enc = tokenizer(
            list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
        bar.update(len(texts[start : start + batch_size]))
    bar.close()
    return torch.cat(out)


def embedding_similarity(pruned: Tensor, dense: Tensor) -> Dict[str, Any]:
    """Cosine similarity of matching rows of two embedding matrices: mean, min and count."""
    cos = nn.functional.cosine_similarity(pruned.double(), dense.double(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "texts": int(cos.numel())}
