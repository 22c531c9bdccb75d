#!/usr/bin/env python3
"""Build the tiny, random-weight model that `make e2e-vllm` serves with real vLLM.

    model.py OUT_DIR

Offline: no model hub. A byte-level BPE tokenizer is trained on a few built-in sentences and
saved with a minimal chat template; the model is a 2-layer Llama (hidden 128, 2 heads of 64)
with seeded random bf16 weights, under 1 MB. Its text is noise, but greedy decoding is
deterministic, so P/D output can be compared with plain output token for token.
Rebuilds nothing if OUT_DIR already holds a model.
"""
import os
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    if all(os.path.exists(os.path.join(out, f)) for f in ("config.json", "tokenizer.json", "model.safetensors")):
        print(f"model already at {out}")
        return 0

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sentences = [
        "San Francisco is a city on a bay, and the fog comes in over the hills.",
        "A prefill server computes the prompt; a decode server generates the answer.",
        "The sidecar routes each request to the prefiller first, then to the decoder.",
        "Paged attention keeps the key and value cache in fixed-size blocks.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
        "Punctuation and symbols: . , ; : ! ? ' \" ( ) [ ] { } < > - _ = + * / \\ | @ # $ % ^ & ~ `",
        "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    ]
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        sentences * 16,
        trainers.BpeTrainer(
            vocab_size=768,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", model_max_length=2048,
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer.save_pretrained(out)

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: supported by vLLM's CPU attention kernels
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"built tiny model in {out}: vocab {len(tokenizer)}, {params} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
