#!/usr/bin/env python3
"""The tokenizer of the tiny Qwen2-Audio and Qwen2-VL fixtures, and the prompts it encodes.

The tiny models of make_qwen2_fixtures.py have a 1000-token vocabulary, too small for Qwen2's
byte-level BPE, so they get a word-level tokenizer.json (Hugging Face `tokenizers`, the library
transformers' fast tokenizers are) over the words of xkd's question prompt and of the synthetic
set's class names, with Qwen2's chat and clip tokens as special tokens at the ids the fixtures'
config.json files give them. Both directories get the same file, as the real Qwen2-Audio and
Qwen2-VL tokenizers share Qwen2's vocabulary.

Also writes fixtures/qwen2_prompt_case.json: for a fixed option list, each family's prompt text
and the ids this library encodes it to. models/tests/qwen2_prompt.rs checks that the Rust
side renders the same text and, through the `tokenizers` crate, gets the same ids.

    python -m venv .venv-ref && .venv-ref/bin/pip install tokenizers==0.21.1
    .venv-ref/bin/python tests/reference/make_tiny_tokenizer.py
"""

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Special tokens at the ids of the tiny configs (audio_token_index 997; image 993, video 994,
# vision start/end 990/991 and vision_token_id 992 in qwen2-vl-tiny's config.json).
SPECIAL = {
    "<|unk|>": 0,
    "<|endoftext|>": 980,
    "<|im_start|>": 981,
    "<|im_end|>": 982,
    "<|vision_start|>": 990,
    "<|vision_end|>": 991,
    "<|vision_pad|>": 992,
    "<|image_pad|>": 993,
    "<|video_pad|>": 994,
    "<|audio_bos|>": 995,
    "<|audio_eos|>": 996,
    "<|AUDIO|>": 997,
}

# The synthetic set's classes (data/src/synth/mod.rs, CLASSES).
CLASSES = [
    "dog barking", "skateboarding", "wind noise", "thunder", "playing badminton",
    "cat meowing", "people eating", "playing acoustic guitar", "church bell ringing",
    "bird chirping, tweeting", "tractor digging", "helicopter", "mouse clicking",
    "cricket chirping", "train horning", "people running", "heart sounds, heartbeat",
    "baby crying", "sailing", "people whispering", "playing drum kit", "skiing",
    "rooster crowing", "ocean burbling",
]

LETTERS = "ABCDEFGHIJ"

# What models/src/qwen/prompt.rs renders (ChatPrompt::text): the instruct checkpoints' chat
# template for one user turn with one clip, default system prompt, assistant turn opened.
CLIP = {
    "audio": "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
    "vl": "<|vision_start|><|video_pad|><|vision_end|>",
}


def question(options):
    q = "Which of these makes the sound? Answer with its letter."
    for letter, option in zip(LETTERS, options):
        q += f"\n{letter}. {option}"
    return q


def prompt(family, options):
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{CLIP[family]}{question(options)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def words(text):
    # The Whitespace pre-tokenizer's split: \w+ | [^\w\s]+
    return re.findall(r"\w+|[^\w\s]+", text)


def main():
    text = " ".join(prompt(f, CLASSES) for f in CLIP)
    for special in SPECIAL:
        text = text.replace(special, " ")
    vocab = dict(SPECIAL)
    next_id = 10
    for w in list(LETTERS) + words(text):
        if w not in vocab:
            vocab[w] = next_id
            next_id += 1
    assert next_id < min(i for i in SPECIAL.values() if i > 0), next_id
    # Unused ids get reserved names (as Qwen2's vocabulary has), so the vocabulary has no holes.
    used = set(vocab.values())
    vocab.update({f"<|extra_{i}|>": i for i in range(1000) if i not in used})

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    for name in ["qwen2-audio-tiny", "qwen2-vl-tiny"]:
        tok.save(str(FIXTURES / name / "tokenizer.json"))

    options = [CLASSES[i] for i in (9, 0, 16, 3, 21, 11, 5, 18, 1, 23)]
    case = {"options": options}
    for family in CLIP:
        t = prompt(family, options)
        case[family] = {"text": t, "ids": tok.encode(t, add_special_tokens=False).ids}
    (FIXTURES / "qwen2_prompt_case.json").write_text(json.dumps(case, indent=1) + "\n")


if __name__ == "__main__":
    main()
