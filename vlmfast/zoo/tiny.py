"""Tiny random-weight LLaVA, Qwen-VL and InternVL models built from configs, with offline processors.

They use transformers' real classes (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``LlavaProcessor``, ``Qwen2VLProcessor``) so every code path that runs on them runs on real checkpoints.
Their weights are random: they exercise mechanics (shapes, positions, hooks), not accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# A small closed vocabulary: enough words for prompts in tests, the CLI demo and the benchmark.
WORDS = (
    "what is in the image ? describe this picture a an the of and with on left right top bottom middle "
    "red green blue yellow purple orange white black circle square triangle star hexagon cross shape "
    "colour color how many are there is it yes no one two three four five six seven eight objects "
    "object see do you where which background please answer briefly detail scene look at small big "
    "large next to above below near count name"
).split()

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _word_tokenizer(special: list[str], extra_words: tuple[str, ...] = ()):
    """A word-level fast tokenizer over WORDS (+ ``extra_words``), with ``special`` tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in [*special, *WORDS, *extra_words, "USER", "ASSISTANT", ":", "user", "assistant", "system"]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.add_special_tokens(special)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tk, vocab


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. Defaults give a model that builds and runs a forward in milliseconds."""

    hidden: int = 32
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32  # LLaVA: pixels; grid = image_size // patch
    patch: int = 4
    seed: int = 0


def _llava_parts(spec: TinySpec):
    """The word tokenizer (left padding), its vocabulary, and the CLIP vision / Llama text configs every tiny LLaVA
    shares."""
    from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tk, vocab = _word_tokenizer(special)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.padding_side = "left"
    vision = CLIPVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch, hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        max_position_embeddings=4096,
    )
    return tok, vocab, vision, text


def tiny_llava(spec: TinySpec = TinySpec(), strategy: Literal["default", "full"] = "default"):
    """A random-weight ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` (offline). ``strategy``: the
    ``vision_feature_select_strategy`` ("full" keeps the CLS feature: grid**2 + 1 tokens per image)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok, vocab, vision, text = _llava_parts(spec)
    n_side = spec.image_size // spec.patch
    cfg = LlavaConfig(  # type: ignore[call-arg]  # pad_token_id: an extra key, taken at runtime, not in its fields
        vision_config=vision, text_config=text,
        image_token_index=vocab["<image>"], image_seq_length=n_side * n_side + (strategy == "full"),
        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=spec.patch,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1, image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_llava_next(spec: TinySpec = TinySpec()):
    """A random-weight ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor`` (offline): CLIP crops of
    ``image_size`` px, grid pinpoints of 1 x 2, 2 x 1 and 2 x 2 crops (LLaVA-v1.6: 336 px crops, up to 2 x 2 and
    1 x 4 / 4 x 1), an ``image_newline`` after each row of the stitched high-resolution grid."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok, vocab, vision, text = _llava_parts(spec)
    s = spec.image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text,
        image_token_index=vocab["<image>"], image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(s // spec.patch) ** 2,
    )
    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=spec.patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl(spec: TinySpec = TinySpec(), max_tiles: int = 4):
    """A random-weight ``InternVLForConditionalGeneration`` and its ``InternVLProcessor`` (offline), laid out like
    transformers' own test-suite tester for the class (an InternViT tower with [CLS] and absolute position
    embeddings, ``quick_gelu``; a Qwen2 text model, its embeddings untied here; ``vision_feature_layer`` -1):
    tiles of ``image_size`` px (InternVL3: 448) of 8 x 8 patches, pixel-shuffled to 4 x 4 tokens each; the image
    processor cuts an image into up to ``max_tiles`` tiles (InternVL3: 12) plus a thumbnail (a 32 x 96 image: 3 x 1
    tiles and the thumbnail; a 112 x 112 one: 2 x 2 and the thumbnail)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tk, vocab = _word_tokenizer(special)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    tok.padding_side = "left"
    per_tile = (spec.image_size // spec.patch // 2) ** 2
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=spec.vision_hidden, num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads, intermediate_size=2 * spec.vision_hidden,
            image_size=spec.image_size, patch_size=spec.patch, hidden_act="quick_gelu",
            use_absolute_position_embeddings=True,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=4096, pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
            bos_token_id=None, tie_word_embeddings=False,
        ),
        image_token_id=vocab["<IMG_CONTEXT>"], image_seq_length=per_tile, vision_feature_layer=-1,
        downsample_ratio=0.5, tie_word_embeddings=False,  # tied, the random model echoes the prompt's last token
    )
    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    image_processor = GotOcr2ImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                            crop_to_patches=True, min_patches=1, max_patches=max_tiles)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=per_tile,
                                  chat_template=INTERNVL_CHAT_TEMPLATE)
    return model, processor


def _qwen_text(spec: TinySpec, extra_words: tuple[str, ...] = ()):
    """The word tokenizer, vocabulary, text config and special-token ids every tiny Qwen-VL shares."""
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tk, vocab = _word_tokenizer(special, extra_words)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tok.padding_side = "left"
    head_dim = spec.hidden // spec.heads
    quarter = head_dim // 2 // 4  # mrope sections must sum to head_dim / 2
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    text = dict(
        vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        max_position_embeddings=4096, pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None,
    )
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    return tok, vocab, text, ids


def _qwen_model_and_processor(model_cls, processor_cls, cfg, spec: TinySpec, tok, vocab, video_processor=None):
    """The random-weight model (seeded) and its processor with Qwen2-VL's image processor and
    ``video_processor`` (a class; Qwen2-VL's by default)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(spec.seed)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    pixels = spec.image_size * spec.image_size
    sizes = dict(patch_size=spec.patch, merge_size=2, temporal_patch_size=2, min_pixels=pixels // 4, max_pixels=pixels)
    if video_processor is None:
        videos = Qwen2VLVideoProcessor(**sizes)
    else:  # Qwen3-VL's: sizes as pixel budgets; every frame kept (vlmfast passes frames, not a clip to sample)
        videos = video_processor(patch_size=spec.patch, merge_size=2, temporal_patch_size=2, do_sample_frames=False,
                                 cap_pixels_per_frame=True,
                                 size={"shortest_edge": pixels // 4, "longest_edge": 16 * pixels})
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                              video_processor=videos, chat_template=QWEN_CHAT_TEMPLATE)
    return model, processor


def tiny_qwen2_vl(spec: TinySpec = TinySpec(patch=14, image_size=112)):
    """A random-weight ``Qwen2VLForConditionalGeneration`` and its ``Qwen2VLProcessor`` (offline)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, vocab, text, ids = _qwen_text(spec)
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.hidden,
            num_heads=spec.vision_heads, mlp_ratio=2, patch_size=spec.patch, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **ids,
    )
    return _qwen_model_and_processor(Qwen2VLForConditionalGeneration, Qwen2VLProcessor, cfg, spec, tok, vocab)


def tiny_qwen2_5_vl(spec: TinySpec = TinySpec(patch=14, image_size=112, vision_layers=4)):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` and its ``Qwen2_5_VLProcessor`` (offline), laid out
    like Qwen2.5-VL-7B: window attention (windows of 2 x 2 merged tokens here, 4 x 4 at 7B's 112 px window) with
    every other block global (``fullatt_block_indexes``; 7B: every 8th, the last one included)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok, vocab, text, ids = _qwen_text(spec)
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.hidden,
            intermediate_size=2 * spec.vision_hidden, num_heads=spec.vision_heads, patch_size=spec.patch,
            spatial_merge_size=2, temporal_patch_size=2, window_size=4 * spec.patch,
            fullatt_block_indexes=list(range(1, spec.vision_layers, 2)),
        ),
        **ids,
    )
    return _qwen_model_and_processor(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, cfg, spec, tok, vocab)


def tiny_qwen3_vl(spec: TinySpec = TinySpec(patch=16, image_size=128), moe: bool = False,
                  vision_intermediate: int | None = None, deepstack: list[int] | None = None):
    """A random-weight ``Qwen3VLForConditionalGeneration`` (``moe``: ``Qwen3VLMoeForConditionalGeneration``, 4
    experts, 2 per token) and its ``Qwen3VLProcessor`` (offline), laid out like Qwen3-VL-8B: DeepStack (the outputs
    of vision blocks 0 and 1, each through its own merger, added to the hidden states of decoder layers 0 and 1 at
    the visual positions; 8B: blocks 8 / 16 / 24 into layers 0-2), interleaved M-RoPE, patch 16 with a learned
    position grid resampled per image, and videos as one span per frame group, each after its text timestamp
    (``<0.0 seconds>``). ``vision_intermediate`` (default 2 x the tower's width) and ``deepstack`` (the blocks whose
    outputs are injected; default all but the last) size the tower otherwise (``bench prefill``'s proxy)."""
    import transformers
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok, vocab, text, ids = _qwen_text(spec, extra_words=("seconds", "<", ">", ".", *"0123456789"))
    text["rope_parameters"]["mrope_interleaved"] = True
    text["head_dim"] = spec.hidden // spec.heads
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=spec.intermediate // 2,
                    decoder_sparse_step=1)
    kind = "Qwen3VLMoe" if moe else "Qwen3VL"
    cfg = getattr(transformers, f"{kind}Config")(
        text_config=text,
        vision_config=dict(
            depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.hidden,
            intermediate_size=vision_intermediate or 2 * spec.vision_hidden, num_heads=spec.vision_heads,
            patch_size=spec.patch, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=(spec.image_size // spec.patch) ** 2,
            deepstack_visual_indexes=list(range(spec.vision_layers - 1)) if deepstack is None else deepstack,
        ),
        **ids,
    )
    return _qwen_model_and_processor(getattr(transformers, f"{kind}ForConditionalGeneration"), Qwen3VLProcessor, cfg,
                                     spec, tok, vocab, video_processor=Qwen3VLVideoProcessor)


ONEVISION_CHAT_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-*-ov-hf's: a turn's images, then its videos, then its text
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}\n{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_onevision(spec: TinySpec = TinySpec()):
    """A random-weight ``LlavaOnevisionForConditionalGeneration`` and its ``LlavaOnevisionProcessor`` (offline), laid
    out like transformers' own tester for the class (a SigLIP tower without [CLS], a Qwen2 text model,
    ``vision_feature_select_strategy="full"``, ``vision_feature_layer=-1``) at TinySpec's sizes, and like
    llava-onevision-qwen2-7b-ov: "anyres_max" grid pinpoints of 1..3 x 1..3 crops of ``image_size`` px (7B: 1..6 x
    1..6 of 384 px), the stitched grid bilinearly downscaled past 4 crops' worth of tokens (``anyres_max_4``; 7B:
    ``anyres_max_9``), a sample with several images given one base crop each, video frames pooled 2 x 2."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipVisionConfig,
    )

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tk, vocab = _word_tokenizer(special)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tok.padding_side = "left"
    s, side = spec.image_size, spec.image_size // spec.patch
    vision = SiglipVisionConfig(
        image_size=s, patch_size=spec.patch, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"], bos_token_id=None,
        max_position_embeddings=4096,
    )
    pinpoints = [[i * s, j * s] for i in (1, 2, 3) for j in (1, 2, 3)]
    aspect = "anyres_max_4"
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        video_token_index=vocab["<video>"], image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    size = {"height": s, "width": s}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tok, num_image_tokens=side * side,
        vision_feature_select_strategy="full", chat_template=ONEVISION_CHAT_TEMPLATE, image_token="<image>",
        video_token="<video>", vision_aspect_ratio=aspect,
    )
    return model, processor
