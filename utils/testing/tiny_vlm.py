"""A tiny randomly initialised vision-language model, written to a folder like a real one.

The image half of ``utils/testing/tiny_llm.py``: image-feature code (``utils.llm.vision``, the
server's frame endpoint) is tested against it, loaded through ``AutoProcessor`` and
``AutoModelForImageTextToText.from_pretrained(path)`` like a hub model, with nothing downloaded.

* Architecture: Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower, an average-pool
  projector and a Gemma 3 decoder (sliding and full attention layers). Chosen over Qwen2-VL because
  Qwen's processors need torchvision (their video processor), which the CPU test environment does
  not install; Gemma 3's processor is image processor + tokenizer and runs on PIL.
* Sizes: decoder 2 layers of hidden size 32 (4 heads of 8, 2 key/value heads), vision tower 1 layer
  of 32; frames are resized to 64 x 64 and cut into 8 x 8 patches, pooled to 16 image tokens, so a
  Craftax-Classic frame (63 x 63) or a full Craftax one (130 x 110) costs 16 tokens.
* Tokenizer: tiny_llm's byte-level BPE (trained on the text renderer's documentation) plus Gemma 3's
  image tokens (``<start_of_image>``, ``<image_soft_token>``, ``<end_of_image>``), and a ChatML chat
  template whose user turn may hold an image part (rendered as ``<start_of_image>``, which the
  processor expands into the image tokens).

Seeded weights and a fixed corpus: two builds give identical files. From the command line::

    python -m utils.testing.tiny_vlm runs/tiny_vlm
    python -m servers.hidden_state_server --model runs/tiny_vlm --preset debug
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.testing.tiny_llm import SEED, _build_tokenizer

IMAGE_SIZE = 64
PATCH_SIZE = 8
IMAGE_TOKENS = 16
IMAGE_SPECIAL_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                        "eoi_token": "<end_of_image>"}

# Config fields per preset: the decoder's ("text") and the vision tower's ("vision").
PRESETS: dict[str, dict] = {
    "tiny": {"text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
             "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2},
             "dtype": "float32"},
    # Shaped like a real model where GPU kernels care (head_dim 64, bfloat16), as tiny_llm's gpu.
    "gpu": {"text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
            "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 2},
            "dtype": "bfloat16"},
}

# ChatML like tiny_llm's, where a message's content may be a list of parts (image, text).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_processor():
    """Gemma 3's processor over tiny_llm's tokenizer with the image tokens added."""
    import transformers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast

    base = _build_tokenizer(CHAT_TEMPLATE)
    base.backend_tokenizer.add_special_tokens(list(IMAGE_SPECIAL_TOKENS.values()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                        pad_token=base.pad_token, extra_special_tokens=IMAGE_SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    # The PIL implementation where transformers has one: it needs no torchvision.
    image_class = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    image_processor = image_class(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=CHAT_TEMPLATE, image_seq_length=IMAGE_TOKENS)


def build_tiny_vlm(directory: str | os.PathLike, preset: str = "tiny", *, device: str = "cpu") -> str:
    """Write a model of ``preset``'s shape and its processor into ``directory``; returns the path."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    processor = _build_processor()
    tokenizer = processor.tokenizer
    text = shape["text"]
    layer_types = ["sliding_attention", "full_attention"] * (text["num_hidden_layers"] // 2)
    config = AutoConfig.for_model(
        "gemma3",
        text_config={**text, "query_pre_attn_scalar": text["head_dim"], "sliding_window": 64,
                     "layer_types": layer_types, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={**shape["vision"], "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        mm_tokens_per_image=IMAGE_TOKENS, boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id, image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=True)
    config.dtype = shape["dtype"]
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config)
        with torch.no_grad():  # transformers starts the projector at zero: frames would not matter
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.initializer_range)
        model = model.to(getattr(torch, shape["dtype"]))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def main(argv: list[str] | None = None) -> str:
    """``python -m utils.testing.tiny_vlm [DIR] [--preset P]``: a model for the server and manual runs."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m utils.testing.tiny_vlm",
        description="Write a tiny random vision-language model (Gemma 3 shape) and its processor to a "
                    "folder, loadable like a hub model (e.g. --model DIR); the folder is printed.")
    parser.add_argument("directory", nargs="?", default="runs/tiny_vlm", metavar="DIR",
                        help="folder to write (created if needed; default: runs/tiny_vlm)")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="the model's shape: tiny (CPU tests) or gpu (head_dim 64, bfloat16, for vLLM); "
                             "default: tiny")
    args = parser.parse_args(argv)
    path = build_tiny_vlm(args.directory, args.preset)
    print(path)
    return path


if __name__ == "__main__":
    main()
