"""Write a small randomly initialised Qwen3 model directory, with a tokenizer, for offline checks.

    python examples/make_tiny_qwen3.py OUT_DIR [--hidden 256] [--layers 4] [--seed 0]

No download: the config is built in code and the tokenizer is a word-level
tokenizer trained in a second on the help topics of ``pydoc_data`` (shipped with
Python). ``s3sparse prune OUT_DIR ...`` then exercises the causal-LM path.
"""

from __future__ import annotations

import argparse

import torch


def tiny_tokenizer(vocab_size: int):
    """A fast word-level tokenizer over the pydoc topics, with [UNK], [PAD] and a <s> BOS."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        list(topics.values()), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "<s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", model_max_length=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer(args.vocab)
    heads = max(1, args.hidden // 64)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads * 2,
        num_key_value_heads=heads,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    print(f"wrote a {args.layers}-block Qwen3 ({sum(p.numel() for p in model.parameters()):,} parameters) to {args.out_dir}")


if __name__ == "__main__":
    main()
