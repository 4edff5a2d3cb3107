"""Offline test models: built from their YAML architecture config with seeded random weights.

No weights can be downloaded where framecast is developed and tested, so test models are made
here: every component is constructed from its config after `torch.manual_seed`, the tokenizer is
a small Unigram (SentencePiece-style) vocabulary made from the word list below, and the whole
pipeline is written with `save_pretrained`. From then on it is loaded exactly like real weights.
Videos from these models are noise; they exist to test the machinery, not the art.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.models import ComponentSpec, ModelSpec

# Whole words get one token each; anything else falls back to characters, so every prompt
# tokenizes, and long prompts cost tokens roughly as they would with a real T5 vocabulary.
WORDS = """
a an the and or of in on at to with without from into over under through across near by for
is are was be being very more most less slow slowly fast quickly gently softly
cat dog fox bird horse fish lion tiger bear wolf rabbit deer owl eagle dragon robot person man
woman child girl boy people crowd astronaut chef dancer musician knight warrior
running walking flying swimming jumping dancing playing singing sitting standing looking
eating drinking driving riding falling rising turning spinning smiling talking reading
red orange yellow green blue purple pink white black gray golden silver dark bright colorful
snow rain fog mist sun sunset sunrise night day sky cloud clouds storm lightning wind fire water
ocean sea river lake beach forest tree trees mountain mountains desert field garden flower flowers
city street road bridge building house room kitchen window door car train boat ship plane
piano guitar violin drum book cup table chair lamp candle clock mirror
cinematic lighting light shadow shadows soft hard warm cold detailed realistic photorealistic
style painting drawing anime cartoon portrait close up wide shot aerial view camera slow motion
high quality sharp focus resolution 4k 8k hdr film grain bokeh background foreground scene
product photography text overlay clean natural readable screen talking head studio
blurry low distorted ugly noisy watermark
""".split()


def build_tokenizer(words: list[str] = WORDS):
    """A T5 tokenizer (Unigram model, T5's special tokens) over `words` plus single characters."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE without merges: one token per byte, so every prompt
    tokenizes) with Qwen's chat markers and a chat template in Qwen's format, as Z-Image uses it."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def build_clip_tokenizer():
    """A CLIP tokenizer (lower-case BPE, words ending in </w>) whose merges make each of WORDS
    one token; anything else falls back to single characters. 77 tokens, as CLIP's."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    for word in dict.fromkeys(WORDS):  # merge left to right: "fox" -> "f o x</w>" -> "fo x</w>" -> "fox</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)


def build_pipeline_dir(spec: ModelSpec, out_dir: Path, tokenizer: Any) -> None:
    """Construct every component from its config with seeded weights and save them as one
    pipeline, with `tokenizer` (the family's kind, from `build_tokenizer` and its siblings)."""
    import torch

    components = {"tokenizer": tokenizer}
    built_before: dict[str, int] = {}  # class -> how many of it were built
    for key, component in spec.components.items():
        if key == "tokenizer":
            continue
        cls = component.load_class()
        config = dict(component.config)
        # A second component of one class (Wan 2.2's two experts) gets weights of its own.
        repeat = built_before.get(component.class_path, 0)
        built_before[component.class_path] = repeat + 1
        torch.manual_seed(spec.weights.build_seed + repeat)
        if key in ("text_encoder", "image_encoder"):  # transformers models: built from their config class
            if key == "text_encoder":
                config["vocab_size"] = len(tokenizer)
            components[key] = cls(cls.config_class(**config))
        elif key == "scheduler":
            components[key] = cls.from_config(config)
        else:
            components[key] = cls(**config)
    pipeline = ComponentSpec(spec.pipeline).load_class()(**components, **spec.pipeline_config)
    pipeline.save_pretrained(out_dir)


def built_path(spec: ModelSpec, cache: Path) -> Path:
    """Where the model is (or will be) built in the cache: keyed by everything it is built from."""
    recipe = {
        "seed": spec.weights.build_seed,
        "pipeline": spec.pipeline,
        "components": {k: [c.class_path, c.config] for k, c in spec.components.items()},
        **({"pipeline_config": spec.pipeline_config} if spec.pipeline_config else {}),
        "words": WORDS,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache / "models" / f"{spec.name}-{digest}"


def ensure_built(spec: ModelSpec, cache: Path, make_tokenizer: Callable[[], Any]) -> Path:
    """Build the model once into the cache (its tokenizer from `make_tokenizer`) and return the directory."""
    target = built_path(spec, cache)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so that concurrent builders never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        build_pipeline_dir(spec, tmp, make_tokenizer())
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
