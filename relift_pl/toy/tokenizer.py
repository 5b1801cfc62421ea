"""Character-level tokenizer for the toy world, built locally (no hub).

One token per byte (GPT-2 byte-level alphabet, no merges), plus four multi-character tokens:
- `<|endoftext|>` (id 0): eos and pad, special (dropped by `skip_special_tokens=True`).
- `<think>`, `</think>`, `\\boxed{`: added as NON-special tokens, like Qwen3's think tags, so that
  decoding a response with `skip_special_tokens=True` keeps them and the reward can find them.

The chat template mirrors the real one in shape (the generation prompt ends with `<think>`) but is
as short as possible: `{problem}=<think>`. System messages are ignored: the toy model never saw
one, and a long system prompt would only cost tokens.

Why byte-level rather than plain characters: transformers 5 `AutoTokenizer` ignores the saved
tokenizer class for `model_type: qwen2` and rebuilds a `Qwen2Tokenizer` (byte-level BPE) from the
vocabulary. With a byte-level vocabulary that rebuild tokenizes exactly like the original, so
`AutoTokenizer` and `PreTrainedTokenizerFast` loads agree, whitespace included.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
THINK_TAGS = ("<think>", "</think>")
BOXED = "\\boxed{"

# Renders user turns as "problem=", assistant turns as "<think>response<eos>", drops the rest.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ m['content'] }}="
    "{%- elif m['role'] == 'assistant' -%}<think>{{ m['content'] }}" + EOS + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<think>{%- endif -%}"
)


def build_toy_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Build the toy world's character-level tokenizer.

    Args:
        model_max_length: recorded in the tokenizer config (the toy model's context).

    Returns:
        A left-padding `PreTrainedTokenizerFast` with eos = pad = `<|endoftext|>` (id 0) and the
        toy chat template. `decode(encode(x)) == x` for any (NFC-normalized) text.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins, one per byte
    vocab = {EOS: 0} | {ch: i + 1 for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    # The same normalizer / pre-tokenizer / decoder as Qwen2Tokenizer (see module docstring).
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (*THINK_TAGS, BOXED)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,  # pad == eos, the Qwen convention
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
