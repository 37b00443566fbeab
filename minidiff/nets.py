"""Denoising networks: the time embedding and the 2D MLP denoiser (lesson 03), the U-Net (lesson 06)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Embed timesteps as [sin(t ω_k), cos(t ω_k)] with ω_k = max_period^(−k/(dim/2)) (Vaswani et al. 2017, §3.5).

    ``t`` is a 1-D tensor of (integer or real) timesteps; the result has shape [len(t), dim]. Low k
    turn quickly with t and separate neighbouring steps; high k turn slowly and give the coarse position.
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even int >= 2, got {dim}")
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLPDenoiser(nn.Module):
    """ε_θ(x_t, t) for low-dimensional data: a residual MLP with the time embedding added in every block.

    Args:
        data_dim: size of one example (2 for the toys).
        hidden: width of the hidden layers.
        num_blocks: residual blocks, each SiLU → Linear → SiLU → Linear.
        time_dim: size of the sinusoidal embedding of t before its own small MLP.
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, num_blocks: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.data_dim, self.time_dim = data_dim, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(num_blocks))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` ([B, data_dim]) at timesteps ``t`` ([B], the schedule's t)."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}] (one timestep per example), got {tuple(t.shape)}")
        time = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h + time)
        return self.output(h)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# The U-Net (lesson 06): residual blocks, attention, down- and up-sampling with skips
# ---------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (fewer when the channels do not divide): statistics per example, not per batch."""
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a skip; the embedding enters between the two convolutions.

    With ``scale_shift`` the embedding gives a per-channel scale and shift of the second normalisation,
    h ← GN(h)·(1 + s) + b ("AdaGN", Dhariwal & Nichol 2021, §3); otherwise it is added, h ← h + e (Ho et al. 2020).
    The last convolution starts at zero, so every block starts as the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float = 0.0,
                 scale_shift: bool = True) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = _group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels * (2 if scale_shift else 1))
        self.norm2, self.dropout = _group_norm(out_channels), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C_in, H, W]; ``embedding``: [B, embedding_dim] (time, plus class if any)."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.embedding(F.silu(embedding))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ/√d) V and the attention weights, written out (lesson 10, eq. 2); the fused
    ``F.scaled_dot_product_attention`` computes the same without materialising the weights.

    Shapes: query [..., Lq, d], key and value [..., Lk, d]; ``mask`` broadcasts to [..., Lq, Lk] and is True
    where a query may look. A masked score is −∞, so it gets exactly zero weight.
    """
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ value, weights


class Attention(nn.Module):
    """Multi-head attention of every pixel over a sequence, with a residual connection (Vaswani et al. 2017).

    Self-attention when ``context_dim`` is None: queries, keys and values all come from the pixels.
    Cross-attention otherwise (lesson 10): queries from the pixels, keys and values from a context
    sequence [B, L, context_dim] such as embedded words; ``context_mask`` [B, L] marks real tokens with True.
    """

    def __init__(self, channels: int, heads: int = 4, context_dim: int | None = None) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads, self.norm, self.is_cross = heads, _group_norm(channels), context_dim is not None
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(context_dim or channels, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _heads(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries, keys and values split into heads, [B, heads, L, C/heads], and the mask as [B, 1, 1, L]."""
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # [B, H·W, C]: one token per pixel
        split = lambda z: z.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  [B, heads, L, C/heads]
        keys, values = self.key_value(pixels if context is None else context).chunk(2, dim=-1)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()
        return split(self.query(pixels)), split(keys), split(values), mask

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [B, C, H, W] → same shape."""
        batch, channels, height, width = x.shape
        queries, keys, values, mask = self._heads(x, context, context_mask)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)  # the fused kernel
        attended = self.out(attended.transpose(1, 2).flatten(2))
        return x + attended.transpose(1, 2).reshape(batch, channels, height, width)

    def weights(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights [B, heads, H·W, L] that :meth:`forward` uses (for drawing where pixels look)."""
        queries, keys, values, mask = self._heads(x, context, context_mask)
        return attention(queries, keys, values, mask)[1]


@dataclass(frozen=True)
class UNetConfig:
    """Everything that builds a :class:`UNet`; the weight card stores exactly these fields.

    Fields:
        in_channels: image channels (1 for MNIST).
        base_channels: channels at full resolution; level i has base_channels · channel_mults[i].
        channel_mults: one entry per resolution level; the image is halved between levels, so the
            side must be divisible by 2^(levels − 1) (28 → 14 → 7 for three levels; 32 → 16 → 8).
        blocks_per_level: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: side lengths at which self-attention follows each block (the middle always has it).
        dropout: dropout inside the residual blocks.
        scale_shift: AdaGN (True) or additive (False) injection of the embedding.
        num_classes: if set, a class embedding with ``num_classes + 1`` rows; row ``num_classes`` is the
            reserved "null" class used when no label is given (classifier-free guidance, lesson 09).
        context_dim: if set, cross-attention to a context sequence after every self-attention (lesson 10).
        image_size: side of the square input.
        heads: attention heads.
    """

    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.1
    scale_shift: bool = True
    num_classes: int | None = None
    context_dim: int | None = None
    image_size: int = 28
    heads: int = 4

    def __post_init__(self) -> None:
        # JSON cards store tuples as lists; keep the config hashable and comparable whatever it was built from.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))


class UNet(nn.Module):
    """ε_θ(x_t, t[, y][, context]) for images: the U-Net of Ho et al. (2020), small enough for a laptop.

    Built from a :class:`UNetConfig`, with any field overridden by keyword: ``UNet(MNIST_UNET, num_classes=10)``
    or ``UNet(base_channels=16)``.
    """

    def __init__(self, config: UNetConfig | None = None, **fields: Any) -> None:
        super().__init__()
        config = replace(config or UNetConfig(), **fields)
        self.config = config
        in_channels, base_channels, channel_mults = config.in_channels, config.base_channels, config.channel_mults
        blocks_per_level, attention_resolutions = config.blocks_per_level, config.attention_resolutions
        dropout, scale_shift, num_classes = config.dropout, config.scale_shift, config.num_classes
        context_dim, image_size, heads = config.context_dim, config.image_size, config.heads
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channel_mults) - 1} "
                             f"(one halving between each of the {len(channel_mults)} levels)")
        self.in_channels, self.image_size = in_channels, image_size
        self.num_classes, self.null_class = num_classes, num_classes
        self.context_dim = context_dim
        embedding_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes else None

        def block(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, embedding_dim, dropout, scale_shift)

        def attention(channels: int, size: int | None = None) -> nn.ModuleList:
            """Self-attention (then cross-attention if there is a context) at the listed sizes; None: always."""
            if size is not None and size not in attention_resolutions:
                return nn.ModuleList()
            cross = [Attention(channels, heads, context_dim)] if context_dim else []
            return nn.ModuleList([Attention(channels, heads), *cross])

        self.input = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skip_channels, channels, size = nn.ModuleList(), [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(blocks_per_level):
                self.down.append(nn.ModuleList([block(channels, base_channels * mult),
                                                attention(base_channels * mult, size)]))
                channels = base_channels * mult
                skip_channels.append(channels)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)
                size //= 2
        self.middle = nn.ModuleList([block(channels, channels), attention(channels), block(channels, channels)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(blocks_per_level + 1):
                self.up.append(nn.ModuleList([block(channels + skip_channels.pop(), base_channels * mult),
                                              attention(base_channels * mult, size)]))
                channels = base_channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(channels, channels, 3, padding=1)))
                size *= 2
        self.output = nn.Sequential(_group_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The vector every residual block sees: MLP(sinusoidal(t)) plus, for a class-conditional net, E[y]."""
        embedding = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full_like(t, self.null_class, dtype=torch.long)
            if y.shape != t.shape or y.min() < 0 or y.max() > self.null_class:
                raise ValueError(f"y must be {tuple(t.shape)} class indices in 0..{self.null_class} "
                                 f"({self.null_class} = no class), got shape {tuple(y.shape)}")
            embedding = embedding + self.class_embedding(y)
        elif y is not None:
            raise ValueError("this UNet has no class embedding (num_classes=None) but a label y was given")
        return embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``x`` [B, C, H, W] at timesteps ``t`` [B]; ``y`` [B] labels, ``context`` [B, L, D]."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}] (one timestep per image), got {tuple(t.shape)}")
        if (context is None) != (self.context_dim is None):
            raise ValueError("give a context exactly when the UNet was built with context_dim")
        embedding = self.embed(t, y)

        def attend(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            for index, layer in enumerate(layers):
                h = layer(h) if index == 0 else layer(h, context, context_mask)
            return h

        h = self.input(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = attend(layer[1], layer[0](h, embedding))
            else:
                h = layer(h)
            skips.append(h)
        h = self.middle[2](attend(self.middle[1], self.middle[0](h, embedding)), embedding)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = attend(layer[1], layer[0](torch.cat([h, skips.pop()], dim=1), embedding))
            else:
                h = layer(h)
        return self.output(h)


# ---------------------------------------------------------------------------------------
# A small digit classifier: the judge (lesson 07) and, given t, the noisy classifier (lesson 09)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitClassifierConfig:
    """Everything that builds a :class:`DigitClassifier`; the weight card stores exactly these fields."""

    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    time_conditional: bool = False
    dropout: float = 0.2


class DigitClassifier(nn.Module):
    """A small CNN for 28×28 digits: three conv stages, global average pooling, a linear read-out.

    ``features(x)`` is the pooled vector before the read-out; the judge's classifier-FID compares
    these between two image sets (lesson 07). With ``time_conditional`` the network also takes the
    timestep, added to every stage as an embedding, and learns p(y | x_t, t) on noised images
    (lesson 09's noise-aware classifier).
    """

    def __init__(self, config: DigitClassifierConfig | None = None, **fields: Any) -> None:
        super().__init__()
        config = replace(config or DigitClassifierConfig(), **fields)
        self.config = config
        num_classes, width, feature_dim = config.num_classes, config.width, config.feature_dim
        time_conditional, dropout = config.time_conditional, config.dropout
        self.time_conditional, self.width = time_conditional, width
        widths = [(1, width), (width, 2 * width), (2 * width, feature_dim)]
        self.stages = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(cin, cout, 3, padding=1), _group_norm(cout),
                           nn.Conv2d(cout, cout, 3, padding=1), _group_norm(cout)]) for cin, cout in widths)
        self.time_mlp = nn.ModuleList(nn.Linear(width, cout) for _, cout in widths) if time_conditional else None
        self.dropout = nn.Dropout(dropout)
        self.readout = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled [B, feature_dim] representation of images ``x`` [B, 1, 28, 28] (at timesteps ``t``)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x must have shape [B, 1, H, W], got {tuple(x.shape)}")
        if self.time_conditional != (t is not None):
            raise ValueError("a time-conditional classifier needs t, a plain one must not get it")
        time = None if t is None else sinusoidal_embedding(t, self.width)
        h = x
        for index, (conv1, norm1, conv2, norm2) in enumerate(self.stages):
            h = F.silu(norm1(conv1(h)))
            if time is not None:
                h = h + self.time_mlp[index](time)[:, :, None, None]
            h = F.silu(norm2(conv2(h)))
            if index < len(self.stages) - 1:
                h = F.max_pool2d(h, 2)
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.readout(self.dropout(self.features(x, t)))
