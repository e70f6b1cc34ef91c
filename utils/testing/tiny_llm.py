"""A tiny randomly initialised Qwen2 model and tokenizer, written to a folder like a real model.

LLM code is tested against this instead of a downloaded model (docs/design.md, Testing): it loads
through ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``,
the same path a hub model takes, so the backends' loading, padding, chat-template and layer logic
run for real, in about a second on a CPU.

* Model: Qwen2 architecture, 2 decoder layers, hidden size 32, 4 attention heads (2 key/value
  heads, so grouped-query attention is exercised), weights drawn with a fixed torch seed.
* Tokenizer: byte-level BPE trained with the ``tokenizers`` package on the text renderer's own
  documentation (which holds full example observations), so observation text splits into a
  realistic number of tokens. Byte-level means any string encodes: no unknown tokens.
  ChatML special tokens and a Qwen-style chat template make system prompts work.

Everything is seeded and the training corpus is fixed, so two builds give identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

HIDDEN_SIZE = 32
NUM_LAYERS = 2
VOCAB_SIZE = 512
SEED = 0

# ChatML, as Qwen2 instruct models use it; enough of it for system + user messages.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """Fixed training text: the text renderer's docstring (example observations) line by line."""
    import utils.text_obs

    lines = [line.strip() for line in (utils.text_obs.__doc__ or "").splitlines() if line.strip()]
    return lines + ["You are an agent playing Craftax.", "What do you do next?"]


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llm(directory: str | os.PathLike) -> str:
    """Write the tiny model and tokenizer into ``directory``; returns the path as a string."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN_SIZE, intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


if __name__ == "__main__":  # python -m utils.testing.tiny_llm DIR: a model for benchmarks or manual runs
    import sys

    print(build_tiny_llm(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_llm"))
