"""The vision transformer: patches, 2-D positions, pooling, and attention that sees the whole image."""
import math

import pytest
import torch

from picochat.errors import PicochatError
from picochat.model.vit import ViT, ViTConfig, patchify, sinusoidal_2d


def unpatchify(tokens: torch.Tensor, p: int, c: int, size: int) -> torch.Tensor:
    """The inverse of patchify, written independently: (B, N, p*p*C) -> (B, C, H, W)."""
    B, g = tokens.size(0), size // p
    out = torch.zeros(B, c, size, size, dtype=tokens.dtype)
    for n in range(g * g):
        r, col = divmod(n, g)
        out[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p] = tokens[:, n].view(B, p, p, c).permute(0, 3, 1, 2)
    return out


def model(**kw) -> ViT:
    torch.manual_seed(0)
    m = ViT(ViTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 16} | kw)).eval()
    torch.nn.init.normal_(m.head.weight, std=0.5)  # the zero-initialised head would hide every difference
    return m


@pytest.mark.parametrize("pool,pos,p,tokens", [("cls", "learned", 2, 17), ("mean", "sinusoidal", 2, 16),
                                               ("cls", "none", 1, 65), ("mean", "learned", 4, 4),
                                               ("cls", "sinusoidal", 8, 2)])
def test_shapes(pool, pos, p, tokens):
    m = model(pool=pool, pos=pos, patch_size=p)
    x = torch.rand(3, 1, 8, 8)
    assert m.config.n_tokens == tokens and m.forward_features(x).shape == (3, tokens, 16)
    logits, loss = m(x, torch.tensor([0, 4, 9]))
    assert logits.shape == (3, 10) and loss.shape == () and m(x)[1] is None
    rgb = ViT(ViTConfig(image_size=12, channels=3, patch_size=3, num_classes=5, n_embd=16, n_head=2, n_layer=1))
    assert rgb(torch.rand(2, 3, 12, 12))[0].shape == (2, 5)
    with pytest.raises(PicochatError, match=r"\(batch, 1, 8, 8\)"):
        m(torch.rand(3, 8, 8))


def test_a_fresh_model_is_uniform_over_the_classes():
    """ViT's zero head: the untrained model says p = 1/K for every class, a loss of exactly ln K."""
    m = ViT(ViTConfig())
    logits, loss = m(torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]))
    assert torch.equal(logits, torch.zeros(4, 10)) and math.isclose(loss.item(), math.log(10), rel_tol=1e-6)


@pytest.mark.parametrize("p,c", [(1, 1), (2, 1), (4, 3), (8, 2)])
def test_patch_embedding_covers_every_pixel_exactly_once(p, c):
    size = 8
    img = torch.arange(2 * c * size * size, dtype=torch.float64).view(2, c, size, size)
    tokens = patchify(img, p)
    assert tokens.shape == (2, (size // p) ** 2, p * p * c)
    assert torch.equal(tokens.flatten().sort().values, img.flatten())  # each value once, none made up
    assert torch.equal(unpatchify(tokens, p, c, size), img)           # and where it belongs: tile n = (r, col)


def test_patch_embedding_is_a_strided_convolution():
    """Linear on patchify(x) = Conv2d(kernel = stride = p), the usual way of writing ViT's patch embedding."""
    torch.manual_seed(0)
    m = ViT(ViTConfig(image_size=8, channels=3, patch_size=2, n_embd=16, n_head=2, n_layer=1))
    x = torch.randn(2, 3, 8, 8)
    W, b = m.patch_embed.weight, m.patch_embed.bias                    # (d, p*p*C), in (y, x, C) order
    conv = torch.nn.functional.conv2d(x, W.view(16, 2, 2, 3).permute(0, 3, 1, 2), b, stride=2)  # (B, d, 4, 4)
    assert torch.allclose(m.patch_embed(patchify(x, 2)), conv.flatten(2).transpose(1, 2), atol=1e-5)


def test_2d_sinusoidal_table():
    h, w, d = 4, 5, 16
    pe = sinusoidal_2d(h, w, d).view(h, w, d)
    assert pe.shape == (4, 5, 16) and pe.abs().max() <= 1
    assert torch.equal(pe[:, :, :8], pe[:, :1, :8].expand(h, w, 8))   # first half: the row only
    assert torch.equal(pe[:, :, 8:], pe[:1, :, 8:].expand(h, w, 8))   # second half: the column only
    r, c, i = 3, 2, 1                                                   # the formula, one entry
    assert math.isclose(pe[r, c, 2 * i].item(), math.sin(r / 10000 ** (4 * i / d)), abs_tol=1e-6)
    assert math.isclose(pe[r, c, 8 + 2 * i + 1].item(), math.cos(c / 10000 ** (4 * i / d)), abs_tol=1e-6)
    flat = pe.view(h * w, d)
    assert len({tuple(v.tolist()) for v in flat}) == h * w             # every cell has its own code
    # PE(a) . PE(b) depends only on the offset b - a, and is sum_i cos(dr w_i) + cos(dc w_i)
    omega = 10000 ** (-4 * torch.arange(d // 4, dtype=torch.float64) / d)
    for (r1, c1), (dr, dc) in [((0, 0), (1, 2)), ((2, 1), (1, 2)), ((1, 3), (2, -3)), ((3, 0), (-3, 4))]:
        dot = float(pe[r1, c1] @ pe[r1 + dr, c1 + dc])
        assert math.isclose(dot, float(torch.cos(dr * omega).sum() + torch.cos(dc * omega).sum()), abs_tol=1e-5)
    with pytest.raises(PicochatError, match="divisible by 4"):
        sinusoidal_2d(2, 2, 6)
    m = model(pos="sinusoidal")
    assert torch.equal(m.pos_emb[0], torch.zeros(16)) and torch.equal(m.pos_emb[1:], sinusoidal_2d(4, 4, 16))
    assert "pos_emb" not in m.state_dict()  # fixed: not a weight


def test_cls_and_mean_pooling_read_what_they_say():
    x = torch.rand(3, 1, 8, 8)
    cls, mean = model(pool="cls"), model(pool="mean")
    assert torch.allclose(cls(x)[0], cls.head(cls.forward_features(x)[:, 0]))
    assert torch.allclose(mean(x)[0], mean.head(mean.forward_features(x).mean(1)))
    assert cls.cls_token is not None and mean.cls_token is None and mean.config.n_tokens == 16


def test_attention_is_bidirectional():
    """The [CLS] token sits first: under a causal mask it would see only itself and every image would get the
    same logits. Changing only the last patch must change them; and every weight is > 0 (nothing masked)."""
    m = model(pool="cls")
    x = torch.rand(2, 1, 8, 8)
    y = x.clone()
    y[:, :, 6:, 6:] += 1.0  # the last 2x2 patch
    assert not torch.allclose(m(x)[0], m(y)[0], atol=1e-4)
    m(x, return_attention=True)
    maps = m.attention_maps()
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    for w in maps:
        assert torch.allclose(w.sum(-1), torch.ones(2, 2, 17)) and bool((w > 0).all())


def test_patches_are_a_set_without_positions_and_a_grid_with_them():
    """The blocks are permutation-equivariant: shuffling the patches of an image shuffles the patch states the
    same way, so with no positions and mean pooling the logits cannot change. Positions (learned or 2-D
    sinusoidal) are what tell the model where each patch is: the logits do change."""
    x = torch.rand(2, 1, 8, 8)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = unpatchify(patchify(x, 2)[:, perm], 2, 1, 8)
    bag = model(pool="mean", pos="none")
    assert torch.allclose(bag.forward_features(shuffled), bag.forward_features(x)[:, perm], atol=1e-5)
    assert torch.allclose(bag(shuffled)[0], bag(x)[0], atol=1e-5)
    for pos in ("learned", "sinusoidal"):
        m = model(pool="mean", pos=pos)
        assert not torch.allclose(m(shuffled)[0], m(x)[0], atol=1e-3), pos


def test_images_in_a_batch_do_not_see_each_other():
    m = model()
    x = torch.rand(5, 1, 8, 8)
    batched = m(x)[0]
    for i in range(5):
        assert torch.allclose(m(x[i:i + 1])[0], batched[i:i + 1], atol=1e-5)


def test_config_mistakes_are_refused_and_round_trip():
    with pytest.raises(PicochatError, match="does not tile"):
        ViTConfig(patch_size=3)
    with pytest.raises(PicochatError, match="multiple of 4"):
        ViTConfig(pos="sinusoidal", n_embd=18, n_head=2)
    with pytest.raises(PicochatError, match="n_head"):
        ViTConfig(n_embd=30, n_head=4)
    c = ViTConfig(pool="mean", pos="sinusoidal", patch_size=4)
    assert ViTConfig.from_dict(c.to_dict()) == c and c.num_params() == ViT(c).num_params()
    with pytest.raises(PicochatError, match="unknown fields"):
        ViTConfig.from_dict(c.to_dict() | {"vocab_size": 3})


def test_a_few_steps_fit_a_small_batch():
    torch.manual_seed(0)
    m = ViT(ViTConfig(n_embd=32, n_head=2, n_layer=2)).train()
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m(x, y)[1].item()
    for _ in range(60):
        loss = m(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
