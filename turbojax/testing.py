"""Small local stand-ins for hub assets, for tests and benchmarks (nothing here is downloaded)."""
from __future__ import annotations

import json

# Qwen3's generation-prompt logic (enable_thinking=False adds an empty think block); Qwen-Image's template is
# applied by the pipeline itself, so one chat template serves both tokenizers.
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def tiny_qwen_tokenizer(corpus=(), vocab_size: int = 300):
    """A byte-level BPE trained on `corpus` (plus the Qwen-Image system prompt) wrapped as a `Qwen2Tokenizer` with
    the Qwen special tokens and chat template. Save it with `save_pretrained` to make a pipeline's `tokenizer/`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    text = ["Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
            "relationships of the objects and background", *corpus, "system user assistant"] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE)
    tok.add_tokens(["<think>", "</think>"])
    return tok
