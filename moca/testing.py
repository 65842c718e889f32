"""Tiny random vision-language checkpoints that stand in for real ones in tests, demos and benchmarks.

Real base models (Qwen2.5-VL-3B and up) cannot be downloaded everywhere; these build in seconds from a
config, with a byte-level BPE tokenizer trained offline on a small built-in corpus.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


SPECIAL_TOKENS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|mask|>"]
ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")

_WORDS = (
    "a an the of and or in on at to with for from by is are was be this that these those it its as "
    "image picture photo page document text caption question answer query find me everyday matches given "
    "represent following what which where how many color colour shape size left right top bottom middle "
    "red green blue yellow orange purple black white gray pink brown circle square triangle star line stripe "
    "one two three four five six big small large tiny background foreground model embedding vector search "
    "retrieval multimodal language vision token attention mask masked patch contrastive training data report "
    "title section chart table figure number year company revenue energy health science lecture economics "
    # the nano world's words (examples/nano/nano_data.py), so that its texts are not spelled out byte by byte
    "diamond cross ring hexagon cyan river market garden harbour forest school bridge castle station library "
    "paper lamp north quiet window winter summer letter music stone cloud bread little early silver coffee pencil "
    "travel simple yard ladder farmer basket candle carpet kettle pepper rabbit violin wallet bottle seen near count "
    "select portion isolates object labeled cropped classification retrieve sentence describes same thing describing "
    "round corners sides equal sharp points standing crossing bars hole ripe tomato fresh grass clear sky lemon plum "
    "pumpkin swimming pool piece coal circles squares triangles stars diamonds crosses rings hexagons"
).split()


def _training_corpus(seed: int, n_sentences: int = 3000) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ",", "\n"])
        sentences.append(sentence)
    return sentences


def make_tiny_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer with the Qwen-VL special tokens and `<|mask|>`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(seed), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_vlm_config(arch: str, tokenizer, hidden_size: int = 128, num_layers: int = 2, vision_depth: int = 2):
    """A tiny random config of one of the supported backbones, with the tokenizer's special token ids."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {ARCHS}.")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    num_heads = 4
    head_dim = hidden_size // num_heads
    # mrope sections (temporal, height, width) must add up to head_dim / 2.
    quarter = head_dim // 8
    mrope_section = [head_dim // 2 - 2 * (3 * quarter // 2), 3 * quarter // 2, 3 * quarter // 2]
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden_size)
    if arch == "qwen3_vl":
        text_config.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section, "mrope_interleaved": True})
        vision_config.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0], num_position_embeddings=64)
    else:
        text_config.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section})
        if arch == "qwen2_5_vl":
            vision_config.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[vision_depth - 1], window_size=112)
        else:
            vision_config = dict(depth=vision_depth, embed_dim=64, hidden_size=hidden_size, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return AutoConfig.for_model(
        arch,
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def tiny_image_processor(arch: str, max_pixels: int = 112 * 112):
    patch_size = 16 if arch == "qwen3_vl" else 14
    factor = 2 * patch_size
    mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]) if arch == "qwen3_vl" else {}
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max_pixels},
        **mean_std,
    )


def make_tiny_vlm(out_dir, arch: str = "qwen2_5_vl", seed: int = 0, hidden_size: int = 128, num_layers: int = 2,
                  vision_depth: int = 2, max_pixels: int = 112 * 112) -> str:
    """Write a tiny random *causal* VLM checkpoint in the backbone's standard transformers format.

    The folder holds the weights of `AutoModelForImageTextToText`, the tokenizer and the image processor
    config, exactly like a real base model on the Hub, so every loader in the project treats it as one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(seed=seed)
    config = tiny_vlm_config(arch, tokenizer, hidden_size=hidden_size, num_layers=num_layers, vision_depth=vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tiny_image_processor(arch, max_pixels=max_pixels).save_pretrained(out_dir)
    return str(out_dir)
