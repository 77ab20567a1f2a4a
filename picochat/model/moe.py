"""Mixture of experts: the feed-forward split into N experts, each token sent to k of them by a router.

    l(x)  = W_r x                          router logits, (N,) per token; W_r is d -> N, no bias, fp32
    S(x)  = the k largest entries of l(x)  (top-k)
    g_e   = exp(l_e) / sum_{j in S} exp(l_j)   for e in S: softmax over the chosen logits only, so the
                                             k gates sum to 1 (Mixtral's renormalised top-k)
    y(x)  = sum_{e in S(x)} g_e FFN_e(x)     each FFN_e is layers.FeedForward (SwiGLU, GELU or ReLU)

With k = 1 the renormalised gate is always 1 and the router would get no gradient from the model's
loss, only from the auxiliary losses; so top-1 uses the Switch Transformer's gate instead, the full
softmax probability g_e = p_e(x) (see below).

Two auxiliary losses keep the router healthy; train/loop.py adds them to every stage's loss with the
coefficients of ModelConfig (moe_aux_loss_coef, moe_z_loss_coef):

    load balance (Switch Transformer, Fedus et al. 2021, eq. 4-6), over the T tokens of a batch:
        L_bal = N * sum_{i=1..N} f_i * P_i
        f_i   = 1/(kT) sum_x sum_{s=1..k} 1{slot s of token x goes to expert i}   fraction of the kT
                token-slots routed to i (a count: no gradient), so sum_i f_i = 1
        P_i   = 1/T sum_x p_i(x),  p(x) = softmax(l(x)) over all N experts        (differentiable)
      L_bal = 1 when routing is uniform (f_i = P_i = 1/N) and grows to N when one expert takes all.
      (Switch routes top-1, so its f_i counts tokens; with top-k we count slots so that 1 stays the optimum.)
    router z-loss (ST-MoE, Zoph et al. 2022, eq. 5):
        L_z = 1/T sum_x (log sum_{j=1..N} exp(l_j(x)))^2       keeps the logits small, so the softmax stays soft

Dropless (as MegaBlocks): every token is processed by all k of its experts however uneven the load; no
capacity factor drops tokens. So a token's output never depends on the other tokens in the batch,
which is why the KV-cache engine's batched, left-padded decoding still equals one row run alone.

Dispatch: the kT (token, expert) slots are sorted by expert, each expert runs once on its contiguous
slice of the gathered inputs (index_select), and the gated outputs are added back per token
(index_add_). Compute is k/N of running every expert on every token, plus the gather and the scatter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import FeedForward


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """L_bal = N * sum_i f_i * P_i.  probs: (T, N) router softmax; expert_idx: (T, k) chosen experts."""
    counts = torch.bincount(expert_idx.reshape(-1), minlength=n_experts)  # (N,) token-slots per expert
    f = counts.to(probs.dtype) / expert_idx.numel()                       # (N,) sums to 1
    P = probs.mean(dim=0)                                                 # (N,) mean router probability
    return n_experts * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_z = mean over tokens of logsumexp(router logits)^2.  logits: (T, N)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoEFeedForward(nn.Module):
    """A drop-in for FeedForward: N experts of FeedForward's shape, a top-k router, dropless dispatch.

    After each forward it keeps what it measured: ``last_balance_loss``, ``last_z_loss`` (scalars) and
    ``last_load`` ((N,) token-slot counts per expert). With ``collect`` set (the training loop sets it),
    training forwards (train mode, grad enabled) also accumulate until ``pop_aux_loss`` / ``pop_load``
    read them: the losses per forward (a stage may run the model more than once per micro-batch) and the
    counts since the last log row. Off by default: a loop that never pops would keep every graph alive.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.moe_experts, config.moe_top_k
        self.aux_coef, self.z_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        # a plain nn.Linear: its weight is read directly in fp32 (below), and int8 quantization leaves it alone
        self.router = nn.Linear(config.n_embd, self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(self.n_experts))
        self.last_balance_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None
        self.collect = False
        self._aux_terms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (balance, z) per training forward
        self._load_sum: Optional[torch.Tensor] = None                   # (N,) counts since pop_load

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, d) -> router logits (T, N) in fp32, chosen experts (T, k), their gates (T, k) (sum 1 if k > 1)."""
        # fp32 even under autocast (ST-MoE's "selective precision"): bf16 logits round near-ties into
        # different top-k choices and make the exp in softmax / z-loss coarse
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # (T, N)
        top_logits, expert_idx = logits.topk(self.top_k, dim=-1)       # (T, k) each
        if self.top_k == 1:  # Switch: p_e(x) over all N, so the router learns from the loss too
            return logits, expert_idx, F.softmax(logits, dim=-1).gather(1, expert_idx)
        gates = F.softmax(top_logits, dim=-1)                          # (T, k): renormalised over the k chosen
        return logits, expert_idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d): every token of the batch, routed independently
        k = self.top_k
        logits, expert_idx, gates = self.route(x)
        self._record(logits, expert_idx)
        # sort the T*k slots (slot j = token j // k, choice j % k) so each expert's slots are contiguous
        flat_expert = expert_idx.reshape(-1)                       # (T*k,)
        order = torch.argsort(flat_expert, stable=True)            # (T*k,) slot ids grouped by expert
        token_of_slot = order // k                                 # (T*k,) token id of each sorted slot
        counts = self.last_load.tolist()                           # one host sync: the split sizes
        x_sorted = x.index_select(0, token_of_slot)                # (T*k, d)
        outs = []
        for e, x_e in enumerate(x_sorted.split(counts)):
            # an expert with no tokens still runs (on 0 rows) when training: every parameter then takes part
            # in the graph, which DDP requires of each step; at inference skipping it saves a few ops per layer
            if counts[e] or torch.is_grad_enabled():
                outs.append(self.experts[e](x_e))                  # (n_e, d)
        y_sorted = torch.cat(outs).to(x.dtype)                     # (T*k, d), same order as x_sorted
        y_sorted = y_sorted * gates.reshape(-1)[order].to(x.dtype).unsqueeze(1)  # gate g_e of each slot
        out = torch.zeros_like(x).index_add_(0, token_of_slot, y_sorted)          # (T, d): sum over k slots
        return out.view(shape)

    def _record(self, logits: torch.Tensor, expert_idx: torch.Tensor) -> None:
        probs = F.softmax(logits, dim=-1)  # (T, N) over all experts: P_i of the balance loss
        bal, zl = balance_loss(probs, expert_idx, self.n_experts), z_loss(logits)
        # last_* are detached (for reading): only the collected terms keep a graph, until popped
        self.last_balance_loss, self.last_z_loss = bal.detach(), zl.detach()
        self.last_load = torch.bincount(expert_idx.reshape(-1), minlength=self.n_experts)  # (N,)
        if self.collect and self.training and torch.is_grad_enabled():  # a forward that will be trained on
            self._aux_terms.append((bal, zl))
            self._load_sum = self.last_load if self._load_sum is None else self._load_sum + self.last_load


def moe_layers(model: nn.Module, collect: bool = False) -> list[MoEFeedForward]:
    """The MoE feed-forwards of a model; collect=True makes them accumulate for pop_aux_loss / pop_load."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for m in layers:
        m.collect = m.collect or collect
    return layers


def pop_aux_loss(layers: list[MoEFeedForward]) -> tuple[Optional[torch.Tensor], dict[str, float]]:
    """The coef-weighted auxiliary loss of the training forwards since the last call, and its parts.

    Each layer's losses are averaged over its forwards, then over layers (so a coefficient means the same
    at any depth, and a logged moe/balance_loss of 1.0 is perfect balance). (None, {}) when nothing ran.
    """
    per_layer = [(torch.stack([b for b, _ in m._aux_terms]).mean(), torch.stack([z for _, z in m._aux_terms]).mean(),
                  m.aux_coef, m.z_coef) for m in layers if m._aux_terms]
    for m in layers:
        m._aux_terms = []
    if not per_layer:
        return None, {}
    loss = sum(ca * b + cz * z for b, z, ca, cz in per_layer) / len(per_layer)
    bal = torch.stack([b.detach() for b, _, _, _ in per_layer]).mean()
    zl = torch.stack([z.detach() for _, z, _, _ in per_layer]).mean()
    return loss, {"moe/balance_loss": float(bal), "moe/z_loss": float(zl)}


def pop_load(layers: list[MoEFeedForward]) -> torch.Tensor:
    """(L, N) token-slot counts per layer and expert since the last call (training forwards), then reset."""
    rows = []
    for m in layers:
        rows.append(m._load_sum if m._load_sum is not None else torch.zeros(m.n_experts, dtype=torch.long))
        m._load_sum = None
    device = next((r.device for r in rows if r.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([r.to(device) for r in rows])
