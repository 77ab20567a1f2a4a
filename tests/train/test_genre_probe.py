"""The probe's parts against outside oracles: our logistic regression against scikit-learn's, and a middle
layer read by hidden_states against the encoder's own forward pass."""
from __future__ import annotations

import pytest
import torch

from picochat.model.bert import BertEncoder
from picochat.model.config import ModelConfig
from picochat.train.genre_probe import fit_logistic


def test_logistic_regression_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    score = X[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(300, generator=g,
                                                                                            dtype=torch.float64)
    y = torch.bucketize(score, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))  # 4 classes
    C = 0.5  # scikit-learn minimises C * sum CE + ||W||^2 / 2, i.e. mean CE + (1 / (C n)) ||W||^2 / 2
    ref = sk.LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X.numpy(), y.numpy())
    W, b = fit_logistic(X, y, 4, l2=1 / (C * len(y)))
    ours = torch.softmax(X @ W.T + b, -1)
    assert torch.allclose(ours, torch.from_numpy(ref.predict_proba(X.numpy())), atol=1e-5)


def test_hidden_states_are_the_forward_pass_layer_by_layer():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16, ffn_hidden=32, pos="learned",
                      norm="layernorm", norm_position="post", activation="gelu", bias=True, tie_embeddings=False)
    enc = BertEncoder(cfg).eval()
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    every = enc.hidden_states(ids, mask)
    assert len(every) == 3 and torch.equal(every[-1], enc(ids, mask))
    two = enc.hidden_states(ids, mask, upto=2)
    assert len(two) == 2 and all(torch.equal(a, b) for a, b in zip(two, every))
