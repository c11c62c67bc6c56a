"""Stable-Diffusion-layout components built from config dicts (diffusers, transformers, tokenizers).

From scratch (offline profiles): a small AutoencoderKL, a UNet2DConditionModel with cross-attention,
a small CLIPTextModel and a CLIP-style BPE tokenizer built in code from the prompt vocabulary. The
assembled ``StableDiffusionPipeline`` saves in the standard diffusers layout, so
``StableDiffusionPipeline.from_pretrained(folder)`` loads it with nothing but diffusers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

from ..config import TextEncoderParams, UNetParams, VAEParams

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ModelError(ValueError):
    pass


def noise_scheduler() -> DDPMScheduler:
    """The SD v1.5 training schedule: 1000 steps, scaled-linear betas, epsilon prediction (STUDY.md B.3)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False)


def build_vae(cfg: VAEParams) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(cfg.block_out_channels),
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=min(16, min(cfg.block_out_channels)), sample_size=32)


def build_unet(cfg: UNetParams, sample_size: int, latent_channels: int, cross_attention_dim: int) -> UNet2DConditionModel:
    if len(cfg.down_block_types) != len(cfg.block_out_channels) or len(cfg.up_block_types) != len(cfg.block_out_channels):
        raise ModelError("ldm_finetune.unet: down_block_types, up_block_types and block_out_channels need the same length")
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=list(cfg.down_block_types), up_block_types=list(cfg.up_block_types),
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(16, min(cfg.block_out_channels)))


def build_tokenizer(prompts: list[str], max_length: int) -> CLIPTokenizerFast:
    """A CLIP-style BPE tokenizer (lower-case, end-of-word suffix ``</w>``, BOS/EOS, EOS padding) for the
    study's prompt vocabulary: most words are one token (a word whose merges lose to another word's in BPE
    rank order, such as "thirty" after "histology", or a hyphenated one, splits into a few pieces, always the
    same ones), and unseen words split into characters. The vocabulary and merges are written out in a fixed order (every character, then
    for each word in sorted order the merges that join it left to right) rather than learned by the
    ``tokenizers`` BPE trainer, whose tie-breaking follows hash-map order and gave other token ids in
    another run."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for p in prompts for w in p.lower().replace(",", " , ").split()})
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for t in [BOS, EOS, *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            joined = left + right
            if joined not in vocab:
                vocab[joined] = len(vocab)
                merges.append((left, right))
            left = joined
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[
        (BOS, vocab[BOS]), (EOS, vocab[EOS])])
    fast = CLIPTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                             model_max_length=max_length)
    too_long = [p for p in prompts if len(fast(p).input_ids) > max_length]
    if too_long:
        raise ModelError(f"ldm_finetune.text_encoder.max_length {max_length} is too short for '{too_long[0]}'")
    return fast


def build_text_encoder(cfg: TextEncoderParams, tokenizer) -> CLIPTextModel:
    conf = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
                          num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                          max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(conf)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def assemble_pipeline(vae, text_encoder, tokenizer, unet, train_scheduler) -> StableDiffusionPipeline:
    """A standard StableDiffusionPipeline (DDIM scheduler from the training schedule, no safety checker)."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(train_scheduler.config, steps_offset=1,
                                                                       set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_components(spec: str, allow_network: bool, root: Path) -> dict:
    """The parts of a pretrained Stable Diffusion (the paper: SD v1.5) from a local folder in the diffusers
    layout, or a hub id the user named with allow_network. A missing part or parts that do not fit each
    other is an error naming the folder."""
    from transformers import AutoTokenizer

    from ..runtime import resolve_weights

    try:
        src, kw = resolve_weights(spec, allow_network, root, "ldm_finetune.pretrained")
    except FileNotFoundError as err:
        raise ModelError(str(err)) from None
    if kw.get("local_files_only"):
        missing = [s for s in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if not (Path(src) / s).is_dir()]
        if missing:
            raise ModelError(f"{src}: not a Stable Diffusion folder in the diffusers layout (missing {', '.join(missing)}/)")
    try:
        parts = {"vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **kw),
                 "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw),
                 "tokenizer": AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
                 "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw),
                 "scheduler": DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)}
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"{src}: cannot load the Stable Diffusion parts: {str(err).splitlines()[0]}") from None
    if parts["unet"].config.cross_attention_dim != parts["text_encoder"].config.hidden_size:
        raise ModelError(f"{src}: unet cross_attention_dim {parts['unet'].config.cross_attention_dim} does not match "
                         f"the text encoder width {parts['text_encoder'].config.hidden_size}")
    if parts["unet"].config.in_channels != parts["vae"].config.latent_channels:
        raise ModelError(f"{src}: unet in_channels {parts['unet'].config.in_channels} != vae latent_channels "
                         f"{parts['vae'].config.latent_channels}")
    return parts
