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

Other shapes (``build_tiny_llm(dir, preset=...)``), same tokenizer:

* ``gpu``: still small, but shaped like a real model where GPU kernels care -- head_dim 64,
  bfloat16 weights -- because vLLM's and SGLang's attention kernels reject toy head sizes
  (``tiny`` has head_dim 8 in float32). For the ``gpu``-marked tests.
* ``qwen3-4b``: Qwen3-4B's config (36 layers, hidden 2560, 32/8 heads of 128, its vocabulary
  size) and a Qwen3-style chat template with the ``enable_thinking`` switch, written *without*
  weights (``weights=False``): engines load it with random weights (vLLM/SGLang
  ``load_format="dummy"``) for throughput checks with no download.

From the command line (``--help`` lists the flags)::

    python -m utils.testing.tiny_llm runs/tiny_llm                                   # the CPU test model
    python -m utils.testing.tiny_llm runs/qwen3-shape --preset qwen3-4b --no-weights
"""

from __future__ import annotations

import os
from pathlib import Path

HIDDEN_SIZE = 32
NUM_LAYERS = 2
VOCAB_SIZE = 512
SEED = 0

# Config fields per preset; the vocabulary size is the tokenizer's unless given.
PRESETS: dict[str, dict] = {
    "tiny": {"model_type": "qwen2", "hidden_size": HIDDEN_SIZE, "intermediate_size": 2 * HIDDEN_SIZE,
             "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
             "dtype": "float32"},
    "gpu": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "dtype": "bfloat16"},
    "qwen3-4b": {"model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0,
                 "max_position_embeddings": 40960, "dtype": "bfloat16"},
}

# ChatML, as Qwen2 instruct models use it; enough of it for system + user messages.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's switch, as its template implements it: thinking off pre-fills an empty think block.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE[:-len("{% endif %}")] + (
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def _corpus() -> list[str]:
    """Fixed training text: the text renderer's docstring (example observations) line by line."""
    import utils.text_obs

    lines = [line.strip() for line in (utils.text_obs.__doc__ or "").splitlines() if line.strip()]
    return lines + ["You are an agent playing Craftax.", "What do you do next?"]


def _build_tokenizer(chat_template: str = CHAT_TEMPLATE):
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
    fast.chat_template = chat_template
    return fast


def build_tiny_llm(directory: str | os.PathLike, preset: str = "tiny", *, weights: bool = True,
                   device: str = "cpu") -> str:
    """Write a model of ``preset``'s shape and the tokenizer into ``directory``; returns the path.

    ``weights=False`` writes config and tokenizer only (for engines' dummy loading). ``device``
    is where random weights are drawn: ``cuda`` makes ``qwen3-4b``'s 4B weights in seconds where a
    CPU takes minutes (a device's random stream differs from the CPU's, so the values do too)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(QWEN3_CHAT_TEMPLATE if fields["model_type"] == "qwen3" else CHAT_TEMPLATE)
    model_type, dtype = fields.pop("model_type"), fields.pop("dtype")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("max_position_embeddings", 4096)
    config = AutoConfig.for_model(
        model_type, **fields, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.dtype = dtype
    if weights:
        torch.manual_seed(SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        model.save_pretrained(path)
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> str:
    """``python -m utils.testing.tiny_llm [DIR] [--preset P] [--no-weights]``: a model for benchmarks or
    manual runs. A real parser, so ``--help`` (or a mistyped flag) is never taken for the folder."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m utils.testing.tiny_llm",
        description="Write a tiny random model and its tokenizer to a folder, loadable like a hub model "
                    "(e.g. --llm-model DIR); the folder is printed.")
    parser.add_argument("directory", nargs="?", default="runs/tiny_llm", metavar="DIR",
                        help="folder to write (created if needed; default: runs/tiny_llm)")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="the model's shape: tiny (CPU tests), gpu (head_dim 64, bfloat16, for vLLM/SGLang), "
                             "qwen3-4b (Qwen3-4B's config; use with --no-weights); default: tiny")
    parser.add_argument("--no-weights", dest="weights", action="store_false",
                        help="write config and tokenizer only, for engines that load random weights themselves")
    args = parser.parse_args(argv)
    path = build_tiny_llm(args.directory, args.preset, weights=args.weights)
    print(path)
    return path


if __name__ == "__main__":
    main()
