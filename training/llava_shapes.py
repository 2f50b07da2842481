"""``tiny-llava-shapes``: transformers' own LLaVA classes at a tiny size, with a ShapesWorld tokenizer.

CLIP vision tower with a CLS token (image 168 px, patch 14 -> 12x12 = 144 visual tokens, features from
layer -2 as in LLaVA-1.5), a 2-layer projector and a Llama decoder; a word-level tokenizer over
ShapesWorld's closed vocabulary; LLaVA-1.5's chat format ("USER: <image>\\n... ASSISTANT:").
Trained by ``python -m training.train_llava`` (see the model card next to the weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vlmfast.zoo.tiny import LLAVA_CHAT_TEMPLATE

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_WORDS = ["USER", ":", "ASSISTANT"]


@dataclass(frozen=True)
class LlavaShapesConfig:
    image_size: int = 168
    patch: int = 14
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 768
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 768

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def to_dict(self) -> dict:
        return asdict(self)


def vocabulary() -> list[str]:
    from vlmfast.datasets.shapes import VOCABULARY

    words = list(SPECIAL)
    for w in [*CHAT_WORDS, *VOCABULARY]:
        if w not in words:
            words.append(w)
    return words


def build_processor(cfg: LlavaShapesConfig = LlavaShapesConfig()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.add_special_tokens(SPECIAL)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.padding_side = "left"
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=cfg.patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(cfg: LlavaShapesConfig = LlavaShapesConfig(), seed: int = 0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = {w: i for i, w in enumerate(vocabulary())}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=cfg.image_size, patch_size=cfg.patch, hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.vision_intermediate, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, projection_dim=cfg.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
            pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
            max_position_embeddings=1024, tie_word_embeddings=False,
        ),
        image_token_index=vocab["<image>"], image_seq_length=cfg.grid * cfg.grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    return model
