"""Support-Query Interaction (SQI): support keys/values fused into the query's self-attention.

Implemented as a diffusers attention processor set on the ``attn1`` (self-attention) layers
only. One :class:`SQIBank` is shared by all of them:

- ``mode = "store"`` (support pass over B·K support items): each layer runs plain
  self-attention and keeps its per-head keys and values, ``[B·K, heads, N, d]``;
- ``mode = "fuse"`` (query pass over B·Q query items): the query items of episode b attend
  over [their own keys; the keys of every support item of episode b] with the matching
  values: one softmax over (1 + K)·N tokens, no mask;
- ``mode = "off"``: plain self-attention.

The stored tensors are not detached: gradients flow through the support pass. Batched
episodes (B > 1) and batched evaluation chunks (Q > 1 queries sharing one support pass) are
the same computation as one episode / one query at a time (tested).

Gradient checkpointing re-runs each transformer block during the backward pass, after the
forward has finished and the bank has been cleared. So the UNet forward carries the pass's
mode and its store in ``cross_attention_kwargs={"sqi": bank.context()}``: a re-run block sees
the mode and the very support tensors of its original call (a store pass re-run does not
store again). Checkpointed gradients equal the plain ones (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SQIContext:
    """What one UNet pass needs: its mode, the shot count and the store it reads or fills."""

    __slots__ = ("mode", "n_shot", "store")

    def __init__(self, mode: str, n_shot: int, store: dict):
        self.mode = mode
        self.n_shot = n_shot
        self.store = store


class SQIBank:
    def __init__(self):
        self.mode = "off"
        self.n_shot = 1
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        # a new dict, not .clear(): re-run (checkpointed) blocks still hold the old one
        self.store = {}
        self.mode = "off"

    def context(self) -> dict:
        """``cross_attention_kwargs`` for the next UNet forward."""
        return {"sqi": SQIContext(self.mode, self.n_shot, self.store)}


class SQIAttnProcessor:
    """Self-attention with the support bank (scaled_dot_product_attention)."""

    def __init__(self, name: str, bank: SQIBank):
        self.name = name
        self.bank = bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, sqi: SQIContext | None = None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"SQI processor {self.name} is for self-attention (attn1) only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b4, channel, height * width).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctx = sqi if sqi is not None else SQIContext(self.bank.mode, self.bank.n_shot, self.bank.store)
        mode = ctx.mode
        if mode == "store":
            ctx.store.setdefault(self.name, (key, value))  # a checkpoint re-run keeps the original
        elif mode == "fuse":
            key, value = self._fuse(key, value, ctx)
        elif mode != "off":
            raise ValueError(f"unknown SQI mode {mode!r}")

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _fuse(self, key, value, ctx: SQIContext):
        if self.name not in ctx.store:
            raise RuntimeError(f"SQI: no stored support keys for {self.name}; run the support pass first")
        s_key, s_value = ctx.store[self.name]
        k_shot = ctx.n_shot
        n_items, heads, n_tok, d = s_key.shape
        if n_items % k_shot:
            raise RuntimeError(f"SQI: {n_items} support items is not a multiple of n_shot={k_shot}")
        n_episodes = n_items // k_shot
        n_query = key.shape[0]
        if n_query % n_episodes:
            raise RuntimeError(f"SQI: {n_query} query items for {n_episodes} episodes")
        per_episode = n_query // n_episodes

        def gather(t):  # [B*K, h, N, d] -> [B*Q, h, K*N, d], episode b's support for its queries
            t = t.view(n_episodes, k_shot, heads, n_tok, d).permute(0, 2, 1, 3, 4)
            t = t.reshape(n_episodes, heads, k_shot * n_tok, d)
            if per_episode > 1:
                t = t.unsqueeze(1).expand(n_episodes, per_episode, heads, k_shot * n_tok, d)
                t = t.reshape(n_query, heads, k_shot * n_tok, d)
            return t

        return torch.cat([key, gather(s_key)], dim=2), torch.cat([value, gather(s_value)], dim=2)


def _plain_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class PlainAttnProcessor(AttnProcessor2_0):
        """diffusers' SDPA processor that accepts (and ignores) the SQI context."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, sqi=None, **kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    return PlainAttnProcessor


def install_sqi(unet) -> SQIBank:
    """Set SQI processors on every ``attn1`` layer and SDPA processors elsewhere; return the bank."""
    plain = _plain_processor()

    bank = SQIBank()
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = SQIAttnProcessor(name, bank)
        else:
            procs[name] = plain()
    unet.set_attn_processor(procs)
    return bank


def count_sqi_layers(unet) -> int:
    return sum(isinstance(p, SQIAttnProcessor) for p in unet.attn_processors.values())
