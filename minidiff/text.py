"""Text conditioning (lesson 10): a word tokenizer, a tiny transformer text encoder, and a U-Net that reads it.

The caption is turned into a sequence of vectors, one per word, by a small transformer; the U-Net's
cross-attention layers (:class:`minidiff.nets.Attention` with a ``context_dim``) then let every pixel look
up the words it needs: queries from the image, keys and values from the text,

    CrossAttention(h, c) = softmax(Q Kᵀ / √d) V,   Q = h W_Q,  K = c W_K,  V = c W_V   (Vaswani et al. 2017;
                                                                                   Rombach et al. 2022, eq. 3)

with the padding positions of c masked out. The encoder is trained jointly with the denoiser, as the
latent-diffusion paper's text-to-image model was (Rombach et al. 2022, §4.3.1): our captions come from a
tiny grammar, so a pretrained language model would bring nothing a few thousand steps cannot learn.

Classifier-free guidance needs "no caption": the null caption is a row of :data:`NULL` tokens, so the
guidance wrapper of lesson 09 (:func:`minidiff.guidance.classifier_free_guidance`) works unchanged, with the
token ids in place of the class labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.data import COLOURS, POSITIONS
from minidiff.guidance import classifier_free_guidance
from minidiff.nets import Attention, UNet, UNetConfig, attention
from minidiff.runtime import standard_normal
from minidiff.samplers import ddim_sample, thresholded
from minidiff.schedules import NoiseSchedule

PAD, NULL, START = "<pad>", "<null>", "<start>"
#: Every word the grammar of :class:`minidiff.data.CaptionedDigits` uses, after the three special tokens.
VOCABULARY: tuple[str, ...] = (PAD, NULL, START, "a", "and", "on", "the", *POSITIONS, *COLOURS,
                               *(str(digit) for digit in range(10)))
WORD_IDS = {word: index for index, word in enumerate(VOCABULARY)}
MAX_TOKENS = 16


def tokenize(captions: str | Sequence[str], max_tokens: int = MAX_TOKENS,
             vocabulary: Sequence[str] = VOCABULARY) -> torch.Tensor:
    """Token ids [N, max_tokens]: ``<start>``, one id per word, then ``<pad>`` (id 0) up to ``max_tokens``.

    Words are split on spaces and lower-cased; a word outside ``vocabulary`` (:data:`VOCABULARY`, or a model's
    ``vocabulary`` after lesson 13's :func:`minidiff.lora.add_words`) is an error, never silently dropped.
    The attention mask is ``ids != 0`` (:func:`padding_mask`).
    """
    if isinstance(captions, str):
        captions = [captions]
    if tuple(vocabulary[:len(WORD_IDS)]) != VOCABULARY:
        raise ValueError("vocabulary must start with minidiff.text.VOCABULARY (new words go after it)")
    word_ids = {word: index for index, word in enumerate(vocabulary)}
    rows = []
    for caption in captions:
        if not isinstance(caption, str):
            raise ValueError(f"captions must be strings, got {type(caption).__name__}")
        words = caption.lower().split()
        unknown = [word for word in words if word not in word_ids or word in (PAD, NULL, START)]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in caption {caption!r}; the vocabulary is "
                             f"{' '.join(vocabulary[3:])}")
        if len(words) + 1 > max_tokens:
            raise ValueError(f"caption {caption!r} has {len(words)} words; at most {max_tokens - 1} fit")
        ids = [WORD_IDS[START], *(word_ids[word] for word in words)]
        rows.append(ids + [WORD_IDS[PAD]] * (max_tokens - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def null_tokens(count: int, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """The null caption of classifier-free guidance, ``count`` times: every position is ``<null>``."""
    return torch.full((count, max_tokens), WORD_IDS[NULL], dtype=torch.long)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True where a token is real (not ``<pad>``): the positions attention may look at."""
    return tokens != WORD_IDS[PAD]


def decode(tokens: torch.Tensor, vocabulary: Sequence[str] = VOCABULARY) -> list[str]:
    """The words of each row of token ids, without the special tokens."""
    return [" ".join(vocabulary[i] for i in row.tolist() if i > WORD_IDS[START]) for row in tokens]


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: x ← x + SelfAttention(LN(x)), x ← x + MLP(LN(x)) (Vaswani et al. 2017)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L, dim], ``mask`` [B, L] (True: a real token) → [B, L, dim]."""
        split = lambda z: z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [B, heads, L, d]
        query, key, value = (split(z) for z in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        attended, _ = attention(query, key, value, mask[:, None, None, :])
        x = x + self.out(attended.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class TextEncoderConfig:
    """Everything that builds a :class:`TextEncoder`."""

    vocab_size: int = len(VOCABULARY)
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_tokens: int = MAX_TOKENS


class TextEncoder(nn.Module):
    """Words → one vector per word: token and position embeddings, then a few transformer blocks."""

    def __init__(self, config: TextEncoderConfig | None = None, **fields: Any) -> None:
        super().__init__()
        self.config = config = replace(config or TextEncoderConfig(), **fields)
        self.tokens = nn.Embedding(config.vocab_size, config.dim)
        self.positions = nn.Parameter(0.02 * torch.randn(config.max_tokens, config.dim))
        self.blocks = nn.ModuleList(EncoderBlock(config.dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] → contextual word vectors [B, L, dim] (padding positions are ignored by attention)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.config.max_tokens or tokens.is_floating_point():
            raise ValueError(f"tokens must be integer ids of shape [B, {self.config.max_tokens}] (see tokenize), "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.tokens(tokens) + self.positions
        for block in self.blocks:
            x = block(x, padding_mask(tokens))
        return self.norm(x)


@dataclass(frozen=True)
class TextUNetConfig:
    """A :class:`TextConditionedUNet`: the U-Net's config (its ``context_dim`` is set to the encoder's width)."""

    # Attention at 8×8 (and in the middle) only: at 16×16 it halved the training speed on an H100 (8.5 vs 12.4
    # it/s at batch 512), and 8×8 cells are fine enough to tell left from right.
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(in_channels=3, image_size=32, base_channels=32,
                                                                 attention_resolutions=(8,)))
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        # a card stores the two parts as dicts: rebuild them, and tie the U-Net's context to the encoder
        unet = self.unet if isinstance(self.unet, UNetConfig) else UNetConfig(**self.unet)
        encoder = self.encoder if isinstance(self.encoder, TextEncoderConfig) else TextEncoderConfig(**self.encoder)
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "unet", replace(unet, context_dim=encoder.dim, num_classes=None))


class TextConditionedUNet(nn.Module):
    """ε_θ(x_t, t, caption): a :class:`TextEncoder` whose word vectors the U-Net's cross-attention reads.

    ``forward(x, t, y)`` takes the caption as token ids ``y`` [B, L] (:func:`tokenize`), like the class label
    of lesson 09's conditional U-Net; ``null_class`` is the ``<null>`` token id, so a row of it is the null
    caption that classifier-free guidance contrasts with.
    """

    def __init__(self, config: TextUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextUNetConfig()
        self.encoder = TextEncoder(self.config.encoder)
        self.unet = UNet(self.config.unet)
        self.null_class = WORD_IDS[NULL]
        #: the words this model reads (lesson 13's adapters append new ones; see :func:`minidiff.lora.add_words`)
        self.vocabulary: tuple[str, ...] = VOCABULARY

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` [B, 3, 32, 32] at timesteps ``t`` [B] given caption tokens ``y`` [B, L]."""
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"give one caption per image: y has {y.shape[0]} rows, x has {x.shape[0]} images")
        return self.unet(x, t, context=self.encoder(y), context_mask=padding_mask(y))


def cross_attention_maps(model: TextConditionedUNet, x_t: torch.Tensor, t: torch.Tensor,
                         tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where does each word look? The softmax weights of every cross-attention layer, by layer name.

    Runs the model once with forward hooks on its cross-attention layers, recomputes each layer's weights
    from its own inputs (:meth:`~minidiff.nets.Attention.weights`), and returns [B, heads, H·W, L] per layer
    (pixels × words).
    """
    maps: dict[str, torch.Tensor] = {}

    def hook(name: str, layer: Attention) -> Any:
        def record(_: nn.Module, inputs: tuple, __: torch.Tensor) -> None:
            maps[name] = layer.weights(*inputs).detach()
        return record

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in model.unet.named_modules()
               if isinstance(layer, Attention) and layer.is_cross]
    try:
        with torch.no_grad():
            model(x_t, t, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def scene_pool(data: Any, count: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pre-rendered scenes of ``data`` on ``device``: (images [count, 3, 32, 32], tokens [count, L])."""
    images, tokens = [], []
    for start in range(0, count, chunk):
        batch_images, captions, _ = data.batch(min(chunk, count - start), generator)
        images.append(batch_images.to(device))
        tokens.append(tokenize(captions).to(device))
    return torch.cat(images), torch.cat(tokens)


@torch.no_grad()
def sample_captions(model: TextConditionedUNet, schedule: NoiseSchedule, captions: Sequence[str], scale: float = 3.0,
                    steps: int = 50, generator: torch.Generator | None = None, batch_size: int = 250,
                    clip_x0: float | None = 1.0, progress: bool = False) -> torch.Tensor:
    """Samples for ``captions``: tokens → classifier-free guidance at ``scale`` → x̂_0 clipped to [−clip_x0, clip_x0]
    → DDIM (η = 0). The shape is the model's input shape ([N, 3, 32, 32] for lesson 10's pixel model).

    Lesson 09's guidance wrapper and lesson 08's sampler and clipping wrapper, unchanged: the caption tokens take
    the place of the class labels. The clipping is not cosmetic for pixels: the clipped cosine schedule ends at
    ᾱ_T ≈ 2.4·10⁻⁹, so at the first step x̂_0 = (x_T − √(1 − ᾱ_T) ε̂)/√ᾱ_T multiplies the network's error by
    1/√ᾱ_T ≈ 2·10⁴, and without clipping the samples blow up to values in the thousands (``clip_x0=None`` turns it
    off, e.g. for latents, which have no fixed range). The starting noise comes from ``generator`` (on the CPU),
    so a seed fixes the images.
    """
    where = next(model.parameters()).device
    tokens = tokenize(list(captions), model.config.encoder.max_tokens, model.vocabulary).to(where)
    shape = (model.config.unet.in_channels, model.config.unet.image_size, model.config.unet.image_size)
    images = []
    for start in tqdm(range(0, len(tokens), batch_size), disable=not progress, desc="sampling captions", leave=False):
        chunk = tokens[start:start + batch_size]
        x_T = standard_normal((len(chunk), *shape), generator, where)
        guided = classifier_free_guidance(model, chunk, scale)
        if clip_x0 is not None:
            guided = thresholded(guided, schedule, clip=clip_x0)
        images.append(ddim_sample(guided, schedule, x_T, steps=steps).cpu())
    return torch.cat(images)
