"""The base U-Net: where attention runs, how text and the null condition enter, shape checks."""

import pytest
import torch

from imagen.attention import AttentionBlock
from imagen.config import stage_config_from_dict
from imagen.stage import build_network

from conftest import randomized

TEXT_DIM = 24


def make_config(**unet):
    settings = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
                "attention_resolutions": [8], "cross_attention_resolutions": [8, 4], "num_head_channels": 8}
    settings.update(unet)
    return stage_config_from_dict({"unet": settings})


def inputs(batch=3, length=6, seed=1, channels=1, size=16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    text = torch.randn(batch, length, TEXT_DIM, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 4:] = False
    return x, t, text, mask


def attention_calls(network, *args, **kwargs):
    """(resolution, self-attention?, text?) of every attention block that ran."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[-1], m.self_attention,
                                                                   m.text_dim is not None)))
             for m in network.modules() if isinstance(m, AttentionBlock)]
    network(*args, **kwargs)
    for hook in hooks:
        hook.remove()
    return calls


@pytest.mark.parametrize("updown", [True, False])
@pytest.mark.parametrize("self_res, text_res", [([8], [8, 4]), ([16, 4], []), ([], [16]), ([4], [4])])
def test_attention_runs_exactly_at_the_configured_resolutions(updown, self_res, text_res):
    config = make_config(attention_resolutions=self_res, cross_attention_resolutions=text_res, resblock_updown=updown)
    network = build_network(config, TEXT_DIM)
    x, t, text, mask = inputs()
    calls = attention_calls(network, x, t, text_emb=text, text_mask=mask)
    ran_at = {resolution for resolution, _, _ in calls}
    assert ran_at == set(self_res) | set(text_res)
    for resolution, self_attention, text_attention in calls:
        assert self_attention == (resolution in self_res)
        assert text_attention == (resolution in text_res)


def test_output_is_zero_at_initialisation_and_has_the_input_shape():
    network = build_network(make_config(), TEXT_DIM)
    x, t, text, mask = inputs()
    out = network(x, t, text_emb=text, text_mask=mask)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output convolution


@pytest.mark.parametrize("projection", [None, 12])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_padding_does_not_change_the_output(pooling, projection):
    network = randomized(build_network(make_config(text_pooling=pooling, text_projection_dim=projection), TEXT_DIM))
    x, t, text, mask = inputs()
    garbage = text.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), TEXT_DIM) * 100
    with torch.no_grad():
        reference = network(x, t, text_emb=text, text_mask=mask)
        polluted = network(x, t, text_emb=garbage, text_mask=mask)
    assert torch.allclose(reference, polluted, atol=1e-5)
    # ... while the same change counts once those positions are unmasked.
    with torch.no_grad():
        unmasked = network(x, t, text_emb=garbage, text_mask=torch.ones_like(mask))
    assert not torch.allclose(reference, unmasked, atol=1e-3)


def test_pooled_text_and_text_attention_each_change_the_output():
    x, t, text, mask = inputs()
    other = torch.randn_like(text)
    # Pooled embedding only: no attention block sees text.
    pooled_only = randomized(build_network(make_config(cross_attention_resolutions=[]), TEXT_DIM))
    with torch.no_grad():
        assert not torch.allclose(pooled_only(x, t, text_emb=text, text_mask=mask),
                                  pooled_only(x, t, text_emb=other, text_mask=mask), atol=1e-4)
    # Text attention only: cut the pooled path (its projection outputs zero).
    attention_only = randomized(build_network(make_config(), TEXT_DIM))
    with torch.no_grad():
        for parameter in attention_only.conditioning.pooled_to_emb[-1].parameters():
            parameter.zero_()
        assert not torch.allclose(attention_only(x, t, text_emb=text, text_mask=mask),
                                  attention_only(x, t, text_emb=other, text_mask=mask), atol=1e-4)


def test_text_projection_feeds_every_attention_block_and_pooling_the_projected_width():
    plain = build_network(make_config(), TEXT_DIM)
    projected = build_network(make_config(text_projection_dim=12), TEXT_DIM)
    widths = {m.text_dim for m in projected.modules() if isinstance(m, AttentionBlock) and m.text_dim}
    assert widths == {12} and projected.conditioning.pool.to_kv.in_features == 12
    assert projected.conditioning.text_projection.in_features == TEXT_DIM
    x, t, text, mask = inputs()
    calls = attention_calls(randomized(projected), x, t, text_emb=text, text_mask=mask)
    assert calls == attention_calls(randomized(plain), x, t, text_emb=text, text_mask=mask)
    # The projection's bias never reaches a masked position.
    seen = []
    hook = projected.down_blocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    projected(x, t, text_emb=text, text_mask=mask)
    hook.remove()
    assert seen[0].shape == (3, 6, 12) and torch.all(seen[0][~mask] == 0) and seen[0][mask].abs().sum() > 0


def test_timestep_changes_the_output():
    network = randomized(build_network(make_config(), TEXT_DIM))
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert not torch.allclose(network(x, t, text_emb=text, text_mask=mask),
                                  network(x, (t + 300) % 1000, text_emb=text, text_mask=mask), atol=1e-4)


@pytest.mark.parametrize("projection", [None, 12])
@pytest.mark.parametrize("null_embedding", ["learned", "zeros"])
def test_dropped_rows_ignore_their_text(null_embedding, projection):
    config = make_config(text_projection_dim=projection)
    config.guidance.null_embedding = null_embedding
    network = randomized(build_network(config, TEXT_DIM))
    x, t, text, mask = inputs()
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        first = network(x, t, text_emb=text, text_mask=mask, drop_text=drop)
        second = network(x, t, text_emb=torch.randn_like(text), text_mask=torch.ones_like(mask), drop_text=drop)
        kept = network(x, t, text_emb=text, text_mask=mask)
    assert torch.allclose(first[drop], second[drop], atol=1e-5)
    assert not torch.allclose(first[~drop], second[~drop], atol=1e-4)
    assert torch.allclose(first[~drop], kept[~drop], atol=1e-5)
    has_parameter = any(name.endswith("null_token") for name, _ in network.named_parameters())
    assert has_parameter == (null_embedding == "learned")


def test_shape_checks_catch_transposed_text_and_wrong_masks():
    network = build_network(make_config(), TEXT_DIM)
    x, t, text, mask = inputs(length=6)
    with pytest.raises(AssertionError, match="text embeddings must be"):
        network(x, t, text_emb=text[..., :5], text_mask=mask)
    with pytest.raises(AssertionError, match="text embeddings must be"):
        network(x, t, text_emb=text.transpose(1, 2), text_mask=mask)
    with pytest.raises(AssertionError, match="text mask must be bool"):
        network(x, t, text_emb=text, text_mask=mask.float())
    with pytest.raises(AssertionError, match="expected x"):
        network(x[:, :, :8, :8], t, text_emb=text, text_mask=mask)
    with pytest.raises(AssertionError, match="given to a base network"):
        network(x, t, text_emb=text, text_mask=mask, low_res=x)


def test_super_resolution_network_uses_low_res_and_aug_level():
    config = stage_config_from_dict({
        "unet": {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
                 "attention_resolutions": [8], "cross_attention_resolutions": [8], "num_head_channels": 8},
        "super_resolution": {"low_res_size": 8},
    })
    network = randomized(build_network(config, TEXT_DIM))
    x, t, text, mask = inputs()
    low_res = torch.randn(3, 1, 8, 8)
    level = torch.full((3,), 0.2)
    with torch.no_grad():
        reference = network(x, t, text_emb=text, text_mask=mask, low_res=low_res, aug_level=level)
        assert not torch.allclose(reference, network(x, t, text_emb=text, text_mask=mask,
                                                     low_res=torch.randn_like(low_res), aug_level=level), atol=1e-4)
        assert not torch.allclose(reference, network(x, t, text_emb=text, text_mask=mask,
                                                     low_res=low_res, aug_level=level + 0.5), atol=1e-4)
    with pytest.raises(AssertionError, match="expected low_res"):
        network(x, t, text_emb=text, text_mask=mask, aug_level=level)
    with pytest.raises(AssertionError, match="needs aug_level"):
        network(x, t, text_emb=text, text_mask=mask, low_res=low_res)


def test_three_channel_images():
    network = randomized(build_network(make_config(channels=3), TEXT_DIM))
    x, t, text, mask = inputs(channels=3)
    assert network(x, t, text_emb=text, text_mask=mask).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("variant", ["pooled_mean_only", "pooled_attention_only", "cross_attention_only"])
def test_the_papers_text_conditioning_variants_are_each_the_only_path_for_text(variant):
    """Imagen's Sec. 4.4 ablation, from YAML: text through a pooled vector alone (mean or
    attention pooling, no cross-attention) or through cross-attention alone (no pooled vector)."""
    settings = {"pooled_mean_only": {"text_pooling": "mean", "cross_attention_resolutions": []},
                "pooled_attention_only": {"text_pooling": "attention", "cross_attention_resolutions": []},
                "cross_attention_only": {"text_pooling": "none"}}[variant]
    network = randomized(build_network(make_config(**settings), TEXT_DIM))
    blocks = [m for m in network.modules() if isinstance(m, AttentionBlock)]
    if variant == "cross_attention_only":
        assert not hasattr(network.conditioning, "pooled_to_emb") and any(b.text_dim for b in blocks)
    else:
        assert all(b.text_dim is None for b in blocks) and hasattr(network.conditioning, "pooled_to_emb")
    x, t, text, mask = inputs()
    with torch.no_grad():
        reference = network(x, t, text_emb=text, text_mask=mask)
        changed = network(x, t, text_emb=torch.randn_like(text), text_mask=mask)
    assert not torch.allclose(reference, changed, atol=1e-4)  # the text still gets in


def test_a_network_without_any_text_path_is_refused():
    with pytest.raises(Exception, match="'unet.text_pooling'.*no text reaches the network"):
        make_config(text_pooling="none", cross_attention_resolutions=[])
