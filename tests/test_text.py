"""Lesson 10: captioned scenes, the tokenizer, cross-attention, caption dropout, the attribute judge and the
shipped text-conditioned model."""

import math

import pytest
import torch

import minidiff
from minidiff.attributes import EMPTY_COLOUR, EMPTY_DIGIT, caption_report, scene_targets
from minidiff.data import COLOURS, HELDOUT_PAIRS, PALETTE, CaptionedDigits, DigitObject, Scene
from minidiff.guidance import classifier_free_guidance
from minidiff.nets import Attention, UNetConfig
from minidiff.text import (
    NULL,
    WORD_IDS,
    TextConditionedUNet,
    TextUNetConfig,
    cross_attention_maps,
    decode,
    null_tokens,
    padding_mask,
    sample_captions,
    tokenize,
)
from minidiff.train import conditional_ddpm_loss
from minidiff.weights import load_weights, save_weights, schedule_from_card

TINY = TextUNetConfig(unet=UNetConfig(in_channels=3, image_size=32, base_channels=8, channel_mults=(1, 2),
                                      blocks_per_level=1, attention_resolutions=(16,)))


def test_tokenizer_pads_masks_and_refuses_unknown_words() -> None:
    tokens = tokenize(["a red 3 on the left", "A Blue 7"])
    assert tokens.shape == (2, 16) and decode(tokens) == ["a red 3 on the left", "a blue 7"]
    assert padding_mask(tokens).sum(1).tolist() == [7, 4]  # <start> plus the words
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        tokenize("a purple 3")
    with pytest.raises(ValueError, match="at most 15 fit"):
        tokenize(" ".join(["a"] * 16))
    with pytest.raises(ValueError, match="unknown word '<null>'"):
        tokenize("<null>")  # special tokens cannot be typed


def test_scenes_are_seeded_captions_follow_the_grammar_and_training_skips_the_heldout_pairs() -> None:
    data = CaptionedDigits("train")
    first = data.batch(64, torch.Generator().manual_seed(3))
    again = data.batch(64, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    scenes = data.sample_scenes(3000, torch.Generator().manual_seed(0))
    assert not any((o.digit, o.colour) in HELDOUT_PAIRS for scene in scenes for o in scene.objects)
    two = [scene for scene in scenes if len(scene.objects) == 2]
    assert 0.45 < len(two) / len(scenes) < 0.55
    assert all({o.position for o in scene.objects} == {"left", "right"} for scene in two)
    assert Scene((DigitObject(3, "red", "left"), DigitObject(7, "blue", "right")), False).caption() == \
        "a red 3 and a blue 7"
    tokenize([scene.caption() for scene in scenes])  # every caption the grammar makes is in the vocabulary


def test_train_and_heldout_scenes_never_share_a_digit_image() -> None:
    train, heldout = CaptionedDigits("train").digits.flatten(1), CaptionedDigits("heldout").digits.flatten(1)
    assert torch.cdist(heldout, train).min() > 0


def test_rendered_colours_and_slots_match_the_scene_without_any_network() -> None:
    """Read each slot by averaging its lit pixels: the colour direction is the palette's, the empty slot black."""
    data = CaptionedDigits("heldout", two_object_share=0.0)
    images, _, scenes = data.batch(200, torch.Generator().manual_seed(1))
    pixels = (images + 1) / 2
    for image, scene in zip(pixels, scenes, strict=True):
        (item,) = scene.objects
        # a left digit covers columns 0..19 at most, a right one 12..31
        lit, dark = (image[:, :, :12], image[:, :, 20:]) if item.position == "left" else (image[:, :, 20:],
                                                                                         image[:, :, :12])
        assert dark.max() < 0.05
        mean = lit.flatten(1)[:, lit.flatten(1).sum(0) > 0.3].mean(1)
        palette = torch.tensor([PALETTE[c] for c in COLOURS])
        cosines = (palette @ mean) / (palette.norm(dim=1) * mean.norm())
        assert COLOURS[int(cosines.argmax())] == item.colour


def test_cross_attention_is_softmax_qk_over_root_d_times_v_with_the_padding_masked() -> None:
    torch.manual_seed(0)
    layer = Attention(8, heads=2, context_dim=6)
    torch.nn.init.normal_(layer.out.weight)  # the output projection starts at zero; make it see the attention
    x, context = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    # by hand: one loop per example and head, the softmax written out with exp, the masked keys left out
    pixels = layer.norm(x).flatten(2).transpose(1, 2)
    queries, (keys, values) = layer.query(pixels), layer.key_value(context).chunk(2, dim=-1)
    expected = torch.zeros(2, 16, 8)
    for b in range(2):
        keep = mask[b]
        for h in range(2):
            cols = slice(4 * h, 4 * h + 4)
            scores = queries[b, :, cols] @ keys[b, keep, cols].T / math.sqrt(4)
            weights = scores.exp() / scores.exp().sum(1, keepdim=True)
            expected[b, :, cols] = weights @ values[b, keep, cols]
    expected = x + layer.out(expected).transpose(1, 2).reshape(2, 8, 4, 4)
    assert torch.allclose(layer(x, context, mask), expected, atol=1e-5)
    # what sits at a masked position cannot matter
    changed = context.clone()
    changed[0, 3:] = 100.0
    assert torch.allclose(layer(x, changed, mask), layer(x, context, mask), atol=1e-6)


def test_padding_tokens_get_exactly_zero_attention_in_the_text_model() -> None:
    model = TextConditionedUNet(TINY).eval()
    tokens = tokenize(["a red 3", "a blue 7 on the left and a green 1 on the right"])
    maps = cross_attention_maps(model, torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), tokens)
    assert maps, "the model has cross-attention layers"
    for weights in maps.values():
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
        assert (weights.transpose(1, 3)[~padding_mask(tokens)] == 0).all()


def test_caption_dropout_replaces_whole_captions_at_the_asked_rate() -> None:
    seen = []

    class Spy(torch.nn.Module):
        null_class = WORD_IDS[NULL]

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.append(y.clone())
            return torch.zeros_like(x)

    from minidiff.schedules import NoiseSchedule

    tokens = tokenize(["a red 3 on the left"] * 4000)
    conditional_ddpm_loss(Spy(), NoiseSchedule.linear(10), torch.zeros(4000, 3), tokens, 0.1,
                          torch.Generator().manual_seed(0))
    rows = seen[0]
    null_rows = (rows == WORD_IDS[NULL]).all(1)
    assert ((rows == WORD_IDS[NULL]).any(1) == null_rows).all()  # never a caption dropped word by word
    assert abs(null_rows.float().mean().item() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 4000)


def test_guidance_takes_caption_tokens_and_a_card_rebuilds_the_text_model(tmp_path) -> None:
    model = TextConditionedUNet(TINY).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.full((3,), 500)
    tokens = tokenize(["a red 3", "a blue 7", "a green 1"])
    with torch.no_grad():
        guided = classifier_free_guidance(model, tokens, 2.0)(x, t)
        conditional, unconditional = model(x, t, tokens), model(x, t, null_tokens(3))
    assert torch.allclose(guided, unconditional + 2.0 * (conditional - unconditional), atol=1e-5)
    card = save_weights(model, tmp_path / "tiny.safetensors", {"schedule": {"kind": "cosine", "T": 10}})
    rebuilt = minidiff.pretrained("tiny", device="cpu", directory=tmp_path)
    assert rebuilt.config == model.config and card["model"]["config"]["unet"]["context_dim"] == 64
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, t, tokens), model(x, t, tokens), atol=1e-2)
    with pytest.raises(RuntimeError):
        load_weights(TextConditionedUNet(), tmp_path / "tiny.safetensors")  # a different size is refused


def test_the_judge_reads_real_scenes_and_scores_wrong_captions_as_wrong() -> None:
    judge = minidiff.pretrained("attribute_judge", device="cpu")
    data = CaptionedDigits("heldout", exclude_heldout_pairs=False)
    images, _, scenes = data.batch(400, torch.Generator().manual_seed(5))
    report = caption_report(judge, images, scenes)
    assert report.colour_accuracy > 0.99 and report.digit_accuracy > 0.97 and report.caption_accuracy > 0.95
    # the same images scored against shuffled scenes: prompt-following is measured, not assumed
    shuffled = caption_report(judge, images, scenes[1:] + scenes[:1])
    assert shuffled.caption_accuracy < 0.2
    # and the swap detector sees swapped colours
    swapped = [Scene(tuple(DigitObject(o.digit, s.objects[1 - i].colour, o.position) for i, o in
                           enumerate(s.objects)), s.say_positions) for s in scenes if len(s.objects) == 2]
    real = [s for s in scenes if len(s.objects) == 2]
    keep = [i for i, s in enumerate(real) if s.objects[0].digit != s.objects[1].digit
            and s.objects[0].colour != s.objects[1].colour]
    two_images = images[[i for i, s in enumerate(scenes) if len(s.objects) == 2]]
    crossed = caption_report(judge, two_images[keep], [swapped[i] for i in keep])
    assert crossed.swap_rate > 0.9 and crossed.binding_accuracy < 0.1
    digits, colours = scene_targets([Scene((DigitObject(4, "green", "right"),))])
    assert digits.tolist() == [[EMPTY_DIGIT, 4]] and colours.tolist() == [[EMPTY_COLOUR, 1]]


def test_the_shipped_text_model_draws_single_captions() -> None:
    model = minidiff.pretrained("text_digits", device="cpu")
    judge = minidiff.pretrained("attribute_judge", device="cpu")
    scenes = CaptionedDigits("heldout", two_object_share=0.0).sample_scenes(16, torch.Generator().manual_seed(2))
    images = sample_captions(model, schedule_from_card(model.card), [s.caption() for s in scenes], 3.0, 20,
                             torch.Generator().manual_seed(0))
    assert caption_report(judge, images, scenes).caption_accuracy >= 0.75


def test_the_written_out_attention_agrees_with_torchs_fused_kernel() -> None:
    """text.attention (used by the encoder and by cross_attention_maps) against torch's own implementation."""
    from minidiff.text import attention

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 7, 8, generator=generator) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=generator) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    out, weights = attention(query, key, value, mask)
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    assert torch.allclose(out, reference, atol=1e-5)
    assert (weights[~mask.expand_as(weights)] == 0).all()
