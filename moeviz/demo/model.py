"""A small decoder-only Mixture-of-Experts transformer, in one plain file (after nanoGPT's model.py).

It is what `moeviz demo` trains and records. Every block's feed-forward is an MoE layer: a `TopKRouter` picks k
of E expert MLPs per token. The router is named and shaped like transformers 5.x routers (`MixtralTopKRouter`:
forward(hidden) -> (router_logits, top_k_weights, top_k_index)) so that the moeviz recorder finds it by class
name, exactly as it finds the routers of Hugging Face models.

Options, each off or on by config:
- capacity factor with dropping (Switch Transformer / GShard): an expert takes at most
  ceil(capacity_factor * tokens * k / E) assignments; slot-0 choices of every token are served before slot-1
  choices, then in token order; the rest are dropped (their gate weight is zeroed, the token keeps its residual).
- noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks"): during training the logits
  get Gaussian noise with a learned, per-expert, input-dependent scale softplus(x W_noise).
- the Switch Transformer auxiliary load-balancing loss  E * sum_i f_i * P_i  where f_i is expert i's share of
  the T*k top-k assignments and P_i its mean router probability (equals 1 for a perfectly uniform router);
- the ST-MoE router z-loss  mean_t logsumexp(logits_t)^2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DemoMoEConfig:
    vocab_size: int = 2048  # tokenizer vocabulary (byte-level BPE trained on the demo corpus)
    block_size: int = 128  # longest sequence the position embedding covers
    n_layer: int = 4  # transformer blocks, each with an MoE feed-forward
    n_head: int = 4  # attention heads
    n_embd: int = 128  # model width d
    n_experts: int = 8  # E: experts per MoE layer
    top_k: int = 2  # k: experts chosen per token
    expert_hidden: int = 256  # hidden width of each expert MLP
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities to sum to 1 (Mixtral) or keep them
    capacity_factor: float | None = None  # None: no capacity limit; else drop assignments over capacity
    noisy_gating: bool = False  # add learned Gaussian noise to router logits while training (Shazeer 2017)
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss in the total loss (0 = off)
    z_loss_coef: float = 0.0  # weight of the router z-loss in the total loss (0 = off; ST-MoE uses 1e-3)
    dropout: float = 0.0  # dropout after attention and MoE (0 for the short demo)

    def to_dict(self) -> dict:
        return asdict(self)


def switch_aux_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i P_i, generalised to top-k.

    f_i = (assignments to expert i) / (T * k), P_i = mean over tokens of softmax(logits)[i]. A router that
    spreads assignments and probability evenly scores 1; one that sends everything to one expert scores E.
    """
    tokens, k = top_k_index.shape  # [T, k]
    probs = F.softmax(router_logits.float(), dim=-1)  # [T, E]
    counts = torch.zeros(n_experts, device=router_logits.device, dtype=torch.float32)
    counts.scatter_add_(0, top_k_index.reshape(-1), torch.ones(tokens * k, device=router_logits.device))  # [E]
    f = counts / (tokens * k)  # [E]
    p = probs.mean(dim=0)  # [E]
    return n_experts * torch.sum(f * p)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def capacity_of(tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * tokens * k / E)."""
    return int(math.ceil(capacity_factor * tokens * top_k / n_experts))


def dropped_assignments(top_k_index: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Bool [T, k], True where an assignment is over its expert's capacity.

    Priority: all slot-0 choices first (in token order), then slot-1, and so on (Switch/GShard), so that a
    token loses its second choice before any token loses its first.
    """
    tokens, k = top_k_index.shape  # [T, k]
    slot_major = top_k_index.t().reshape(-1)  # [k*T], slot 0 of every token first
    one_hot = F.one_hot(slot_major, n_experts)  # [k*T, E]
    position = (one_hot.cumsum(dim=0) - 1).gather(1, slot_major[:, None]).squeeze(1)  # [k*T] place in its expert's queue
    return (position >= capacity).reshape(k, tokens).t()  # [T, k]


class TopKRouter(nn.Module):
    """Linear router with softmax top-k selection; returns (router_logits, top_k_weights, top_k_index).

    The logits returned are the ones selection used (noisy ones while training with noisy gating). Weights of
    assignments dropped for capacity are zeroed and the drop mask is kept in `last_dropped` ([T, k] bool).
    """

    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        self.top_k = config.top_k
        self.num_experts = config.n_experts
        self.hidden_dim = config.n_embd
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.n_embd))
        nn.init.normal_(self.weight, std=0.02)
        self.noise_weight = nn.Parameter(torch.zeros(config.n_experts, config.n_embd)) if config.noisy_gating else None
        self.last_dropped: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # [T, d]
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(hidden_states, self.noise_weight))  # [T, E]
            router_logits = router_logits + torch.randn_like(router_logits) * noise_std
        probs = F.softmax(router_logits.float(), dim=-1)  # [T, E]
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # [T, k], [T, k]
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if self.capacity_factor is not None:
            capacity = capacity_of(top_k_index.shape[0], self.num_experts, self.top_k, self.capacity_factor)
            dropped = dropped_assignments(top_k_index, self.num_experts, capacity)  # [T, k]
            top_k_weights = top_k_weights.masked_fill(dropped, 0.0)
            self.last_dropped = dropped
        top_k_weights = top_k_weights.to(hidden_states.dtype)
        return router_logits, top_k_weights, top_k_index


class Expert(nn.Module):
    """One expert: a two-layer GELU MLP d -> expert_hidden -> d."""

    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.expert_hidden)
        self.down = nn.Linear(config.expert_hidden, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoELayer(nn.Module):
    """Router + experts. Keeps this forward's auxiliary losses in `aux_loss` and `z_loss` for the model to sum."""

    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        self.n_experts = config.n_experts
        self.gate = TopKRouter(config)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.n_experts))
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d = x.shape
        flat = x.reshape(-1, d)  # [T, d]
        router_logits, weights, index = self.gate(flat)  # [T, E], [T, k], [T, k]
        out = torch.zeros_like(flat)  # [T, d]
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(index == e)  # [n_e], [n_e]
            if token_idx.numel() == 0:
                continue
            y = expert(flat[token_idx]) * weights[token_idx, slot, None]  # [n_e, d]
            out.index_add_(0, token_idx, y)
        self.aux_loss = switch_aux_loss(router_logits, index, self.n_experts)
        self.z_loss = router_z_loss(router_logits)
        return out.reshape(batch, seq, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 x [b, t, d]
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # [b, h, t, d/h]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.moe = MoELayer(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.moe(self.ln_2(x)))


class DemoMoE(nn.Module):
    """Decoder-only MoE language model. forward(input_ids, targets) -> (logits, loss, parts).

    `loss` is the total loss that training minimises (cross-entropy + aux_loss_coef * aux + z_loss_coef * z);
    `parts` holds its pieces as detached tensors: 'lm_loss', 'aux_loss' and 'z_loss' (means over layers),
    reported whether or not their coefficients are zero, so that runs with and without them compare.
    """

    def __init__(self, config: DemoMoEConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = input_ids.shape  # [batch, seq]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # [b, t, d]
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # [b, t, vocab]
        aux = torch.stack([blk.moe.aux_loss for blk in self.blocks]).mean()
        z = torch.stack([blk.moe.z_loss for blk in self.blocks]).mean()
        if targets is None:
            return logits, None, {"aux_loss": aux.detach(), "z_loss": z.detach()}
        lm = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss = lm + self.config.aux_loss_coef * aux + self.config.z_loss_coef * z
        return logits, loss, {"lm_loss": lm.detach(), "aux_loss": aux.detach(), "z_loss": z.detach()}

    def routers(self) -> list[TopKRouter]:
        return [blk.moe.gate for blk in self.blocks]


def router_adapter(n_experts: int, top_k: int):
    """A moeviz router adapter that also reports capacity drops (`TopKRouter.last_dropped`) to the Recorder.

    The built-in adapter reads (logits, weights, index) but cannot know which assignments the model dropped;
    pass `Recorder(model, ..., adapter=router_adapter(E, k))` when `capacity_factor` is set.
    """
    from collectors.routers import RouterAdapter, RouterOutput

    class DemoRouterAdapter(RouterAdapter):
        def __call__(self, module, inputs, output):
            logits, weights, index = output  # [T, E], [T, k], [T, k]
            dropped = module.last_dropped if module.capacity_factor is not None else None  # [T, k] bool
            return RouterOutput(logits=logits, index=index, weights=weights, dropped=dropped)

    adapter = DemoRouterAdapter()
    adapter.n_experts, adapter.top_k = n_experts, top_k
    return adapter
