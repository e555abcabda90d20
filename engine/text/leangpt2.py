"""A lean decoding forward for GPT-2 models: the HF model's own weights, none of its per-call machinery.

Generating one token with a small GPT-2 through `GPT2LMHeadModel.forward` runs ~55 nn.Module calls,
builds attention masks, cache objects and output dataclasses; for the bundled 2.6M-parameter model
that bookkeeping costs several times the arithmetic. This module does the same computation in
nanoGPT style: per layer one LayerNorm, one fused qkv matmul, scaled-dot-product attention over a
preallocated KV cache (written in place, never concatenated), the output projection and the MLP.

It reads the parameters of the loaded HF model (no copy; same dtype and device) and is used only for
decoding; training, perplexity and token scores stay on the HF model. `LeanGPT2.supports(model)` says
whether a model matches what is implemented here; anything else keeps the HF forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class LeanGPT2:
    """prefill(ids) then step(next_ids) -> last-position logits, with the KV cache kept inside."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.model = model
        self.n_head = cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = ACTIVATIONS[cfg.activation_function]
        self.n_positions = cfg.n_positions
        t = model.transformer
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, t.ln_f
        self.lm_head = model.lm_head.weight
        self.layers = []
        for i, block in enumerate(t.h):
            a, m = block.attn, block.mlp
            scale = a.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            self.layers.append((block.ln_1, a.c_attn, a.c_proj, scale, block.ln_2, m.c_fc, m.c_proj))
        self.k = self.v = None
        self.pos = self.max_len = 0
        self.pads = None  # (B,) left-padding of each row when prompts of different lengths share a batch

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(model, "transformer") and hasattr(model, "lm_head")
                and not cfg.reorder_and_upcast_attn and cfg.activation_function in ACTIVATIONS
                and not getattr(cfg, "add_cross_attention", False))

    @staticmethod
    def _conv1d(x: torch.Tensor, conv) -> torch.Tensor:
        # HF's Conv1D is a linear layer with the weight stored transposed: y = x @ W + b
        return torch.addmm(conv.bias, x.view(-1, x.size(-1)), conv.weight).view(*x.shape[:-1], -1)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        pos = self.pos
        if pos + T > self.max_len or (T > 1 and pos > 0):
            raise ValueError(f"the KV cache holds {self.max_len} positions, filled by a prompt then one token at a time")
        mask = None
        if self.pads is None:
            x = F.embedding(ids, self.wte) + self.wpe[pos:pos + T]
        else:
            # Left-padded rows: each row's positions count from its first real token, and no query sees
            # a pad key. A pad query may see itself only (so that its softmax is never over nothing:
            # a NaN there would reach real rows through 0 * NaN in the attention product).
            q_at = torch.arange(pos, pos + T, device=ids.device)
            x = F.embedding(ids, self.wte) + self.wpe[(q_at[None] - self.pads[:, None]).clamp(min=0)]
            k_at = torch.arange(pos + T, device=ids.device)
            real = k_at[None, :] >= self.pads[:, None]                                    # (B, keys)
            mask = (k_at[None, :] <= q_at[:, None])[None] & (real[:, None, :] | (k_at[None, :] == q_at[:, None])[None])
            mask = mask[:, None]                                                          # (B, 1, T, keys)
        H = self.n_head
        for i, (ln1, c_attn, c_proj, scale, ln2, c_fc, c_proj2) in enumerate(self.layers):
            h = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, self.eps)
            q, k, v = self._conv1d(h, c_attn).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
            self.k[i][:, :, pos:pos + T] = k
            self.v[i][:, :, pos:pos + T] = v
            keys, values = self.k[i][:, :, :pos + T], self.v[i][:, :, :pos + T]
            # the prompt attends causally; one new token may see every cached position
            if mask is None:
                y = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1 and pos == 0, scale=scale)
            else:
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            x = x + self._conv1d(y.transpose(1, 2).reshape(B, T, -1), c_proj)
            h = F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, self.eps)
            x = x + self._conv1d(self.act(self._conv1d(h, c_fc)), c_proj2)
        x = self.ln_f(x[:, -1])
        self.pos = pos + T
        return F.linear(x, self.lm_head)  # (B, vocab): only the last position's logits

    def prefill(self, ids: torch.Tensor, max_new_tokens: int, pads: list[int] | None = None) -> torch.Tensor:
        """Start a batch of sequences with the prompt ids (B, T); returns the logits after its last token.

        The cache is sized for the prompt plus `max_new_tokens` (not the model's whole context).
        `pads`: how many of each row's first ids are padding (prompts of different lengths, left-padded).
        """
        B, T = ids.shape
        self.pads = torch.tensor(pads, device=ids.device) if pads and any(pads) else None
        self.max_len = min(T + max_new_tokens, self.n_positions)
        hd = self.wte.size(1) // self.n_head
        shape = (B, self.n_head, self.max_len, hd)
        dtype, device = self.wte.dtype, self.wte.device
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.pos = 0
        return self._forward(ids)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (B,) -> logits (B, vocab)."""
        return self._forward(next_ids[:, None])
