"""Build a tiny random Llama-style model and a character-level tokenizer with a chat template.

Used by the CPU quickstart and the tests; nothing is downloaded.

    python scripts/make_tiny_model.py --output tiny_models/llama-tiny --hidden-size 128 --layers 2
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# One token per printable ASCII character: enough for arithmetic, traces and judge prompts.
CHARACTERS = [c for c in string.printable if c not in "\x0b\x0c\r"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join back without spaces
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_tiny_model(tokenizer, hidden_size: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
                     max_position_embeddings: int = 512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(output: str | Path, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                    seed: int = 0) -> Path:
    output = Path(output)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size, layers, heads, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tiny_models/llama-tiny")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = save_tiny_model(args.output, args.hidden_size, args.layers, args.heads, args.seed)
    print(f"saved tiny model and tokenizer to {path}")


if __name__ == "__main__":
    main()
