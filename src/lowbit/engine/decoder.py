"""A lean forward pass of a pre-norm decoder (the llama family, and Gemma 3) over a preallocated KV cache.

It reuses the loaded model's own parts (embedding, norms, activation, rotary tables, Linears or QuantLinears)
and only changes how they are called: q/k/v and gate/up run as one fused matmul each, the rotary cos/sin
come from a table computed once, and the KV cache is a fixed-size tensor written in place, so one decode step
has static shapes and can be compiled into a single graph. Which modules make up a block comes from the
architecture table (`models.arch`), never from `if` branches on the model family: Gemma 3's sandwich norms,
(1 + w) norms, per-layer sliding windows and per-layer-type rotary tables are options of the same block,
fixed when the engine is built, so a decode step does the same Python work for every family.

Shapes: batch 1; hidden states [1, T, hidden]; queries [1, heads, T, head_dim]; the cache of a layer
[1, kv_heads, max_len, head_dim] (see engine.cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..errors import LowbitError
from ..kernels import native_attention, native_dense
from ..models.arch import arch_for
from ..models.moe import ExpertList
from ..nn.fuse import fuse_linears
from ..nn.qembedding import QuantEmbedding
from ..nn.qlinear import QuantLinear
from ..offload.runtime import streaming_of
from .cache import ChannelKeyKVCache, HostKVCache, StaticKVCache
from .reduction import aten_width, mean_of_squares


class RMSNorm(nn.Module):
    """The llama-family RMSNorm (weight · normalize(x in float32) cast back) over the model's own norm module,
    whose weight is looked up at each call (a streamed block's weight is swapped in only while it runs)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.source = norm
        self.eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        # in a compiled step, mean(x²) as explicit additions in ATen's order where they reproduce it (about
        # 2.6 µs less per norm and token than calling ATen's kernel from the graph; see engine.reduction)
        n = norm.weight.shape[-1] if norm.weight.numel() else 0
        self.width = aten_width(n) if n else None

    def mean_of_squares(self, x):
        # ATen's CPU order only: on a GPU the reference sums in CUDA's order, so ATen's kernel is called there
        if self.width is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            return mean_of_squares(x, self.width)
        return x.pow(2).mean(-1, keepdim=True)

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(self.mean_of_squares(x) + self.eps)
        return self.source.weight * x.to(dtype)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalize(x) · (1 + w), both in float32, then cast back (not llama's cast-then-scale)."""

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(self.mean_of_squares(y) + self.eps)
        return (y * (1.0 + self.source.weight.float())).type_as(x)


class NativeDense(nn.Module):
    """A plain 16-bit Linear whose calls of a few rows (a decoded token's) run on lowbit's CPU kernel
    (kernels.native_dense), more rows through PyTorch as the Linear itself would. Its weight is looked up at
    each call (a streamed block's weight is swapped in only while it runs)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.source = linear

    def forward(self, x):
        return native_dense.linear(x, self.source.weight, self.source.bias)


class _Concat(nn.Module):
    """The unfused fallback: the Linears one after another, outputs concatenated."""

    def __init__(self, mods):
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x):
        return torch.cat([m(x) for m in self.parts], dim=-1)


def _fused(mods, fuse: bool = True) -> tuple[nn.Module, list[int]]:
    """Quantized Linears are fused (one packed matmul: +13% decode speed compiled, +20% eager for INT4 g64 on
    the default model). Plain 16/32-bit ones are not: their matmuls are bound by memory bandwidth either way
    (measured no faster fused), and a fused copy would hold their weights twice."""
    sizes = [m.out_features for m in mods]
    fuse = fuse and all(isinstance(m, QuantLinear) for m in mods)
    return (fuse and fuse_linears(mods)) or _Concat(mods), sizes


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _optional(mod: nn.Module | None) -> nn.Module:
    return nn.Identity() if mod is None else mod


class DecoderBlock(nn.Module):
    """h += o(attention(rope(q), rope(k), v));  h += down(act(gate(x)) · up(x)), each after its norm
    (and, where the family has them, each branch's output through its own norm)."""

    def __init__(self, block: nn.Module, names, config, fuse: bool = True, window: int | None = None):
        """fuse=False calls the block's own Linears one by one (for a streamed block, whose weights are
        swapped in only while it runs, so a fused copy made now would be empty). window: this layer attends
        only to the last `window` positions (its own included)."""
        super().__init__()
        get = block.get_submodule
        Norm = OffsetRMSNorm if names.norm_offset else RMSNorm
        self.input_norm = Norm(get(names.input_norm))
        self.post_norm = Norm(get(names.post_norm))
        self.attn_out_norm = _optional(names.attn_out_norm and Norm(get(names.attn_out_norm)))
        self.mlp_out_norm = _optional(names.mlp_out_norm and Norm(get(names.mlp_out_norm)))
        self.window = window
        self.qkv, self.qkv_sizes = _fused([get(names.q), get(names.k), get(names.v)], fuse)
        self.o = get(names.o)
        dense = not names.moe or hasattr(get(names.moe), names.gate.rpartition(".")[2])   # dense layers of MoE models
        # a mixture-of-experts layer: a prompt runs the model's own module (routing picks experts per token,
        # which no fused matmul expresses); a decoded token runs its router and, for unstacked experts,
        # ExpertList.dense, whose shapes do not depend on the routing, so the decode step stays one graph
        self.moe = None if dense else get(names.moe)
        experts = None if dense else getattr(self.moe, names.moe_experts, None)
        self.experts = experts if isinstance(experts, ExpertList) else None
        self.router = None if self.experts is None else getattr(self.moe, names.moe_router)
        self.experts_gate_up = None
        self.experts_down = None   # the experts' down projections as the decoder calls them (Decoder.dense)
        if self.experts is not None:
            # every expert's gate and up in one packed matmul ([n, E·2I]: g0 u0 g1 u1 ...): the decode step
            # runs all experts anyway, and one call instead of 2E removes most of the per-layer cost beyond
            # the matmuls (each call casts its input and dispatches a kernel)
            parts = [m for e in self.experts for m in (e.gate_proj, e.up_proj)]
            uniform = len({m.out_features for m in parts}) == 1
            self.experts_gate_up = _fused(parts, fuse)[0] if uniform else None
        if dense:
            self.gate_up, self.gate_up_sizes = _fused([get(names.gate), get(names.up)], fuse)
            self.down = get(names.down)
        self.q_norm = Norm(get(names.q_norm)) if names.q_norm else None
        self.k_norm = Norm(get(names.k_norm)) if names.k_norm else None
        self.act = ACT2FN[getattr(config, "hidden_act", None) or config.hidden_activation]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.native_attention = False   # a decoded token's attention on lowbit's kernel (Decoder sets it)

    def _moe(self, x, one_token: bool):
        if not one_token or self.experts is None:
            return self.moe(x)
        flat = x.view(-1, x.shape[-1])
        _logits, weights, index = self.router(flat)
        if self.experts_gate_up is None:
            return self.experts.dense(flat, index, weights).view_as(x)
        return self._experts_dense(flat, index, weights).view_as(x)

    def _experts_dense(self, flat, index, weights):
        """ExpertList.dense with the experts' gate/up as one matmul: the same values in the same order (each
        output column of a fused matmul is its Linear's own dot product; the downs and the weighted adds run
        expert by expert as there), so the result is bit-equal."""
        n, E = flat.shape[0], len(self.experts)
        w = torch.zeros(n, E, dtype=weights.dtype, device=flat.device).scatter(1, index, weights)
        gu = self.experts_gate_up(flat).view(n, E, 2, -1)
        mid = self.experts[0].act_fn(gu[:, :, 0]) * gu[:, :, 1]          # [n, E, I]
        out = torch.zeros_like(flat)
        downs = self.experts_down or [expert.down_proj for expert in self.experts]
        for e, down in enumerate(downs):
            out = out + (down(mid[:, e]) * w[:, e, None]).to(out.dtype)
        return out

    def _heads(self, t, n):
        return t.view(t.shape[0], t.shape[1], n, self.head_dim)

    def forward(self, h, cos, sin, cache: StaticKVCache, layer: int, pos, visible: int | None):
        """h: [1, T, hidden]; cos/sin: [1, T, head_dim]; pos: LongTensor [T] of cache positions;
        visible: None for a prefill from position 0 (causal over the new keys), else the number of cache
        positions a single new query attends to (its own included)."""
        x = self.input_norm(h)
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)
        q, k, v = self._heads(q, self.heads), self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        cache.update(layer, pos, k, v)
        t = q.shape[2]
        if visible is None and (self.window is None or t <= self.window):
            a = cache.prefill_attention(q, k, v, self.scale)   # attend to the new keys only, causally
        elif visible is None:   # a prefill longer than the window: causal within a band of `window` keys
            i = torch.arange(t, device=q.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
            a = F.scaled_dot_product_attention(q, cache.roundtrip(k), cache.roundtrip(v), attn_mask=band,
                                               scale=self.scale, enable_gqa=self.heads != self.kv_heads)
        else:
            keys, values = cache.read(layer, visible)
            if self.window is not None and visible > self.window:   # the reference keeps only the window too
                keys, values = keys[:, :, visible - self.window:], values[:, :, visible - self.window:]
            if self.native_attention:
                a = native_attention.decode_attention(q, keys, values, self.scale)
            else:   # the same call as the reference's, over exactly the keys seen so far (no mask: bit-equal)
                a = F.scaled_dot_product_attention(q, keys, values, scale=self.scale,
                                                   enable_gqa=self.heads != self.kv_heads)
        a = a.transpose(1, 2).reshape(h.shape[0], h.shape[1], self.heads * self.head_dim)
        h = h + self.attn_out_norm(self.o(a))
        x = self.post_norm(h)
        if self.moe is not None:
            return h + self.mlp_out_norm(self._moe(x, one_token=visible is not None))
        g, u = self.gate_up(x).split(self.gate_up_sizes, dim=-1)
        return h + self.mlp_out_norm(self.down(self.act(g) * u))


ATTENTION = DENSE = ("auto", "native", "reference")


def _check_choice(option: str, choice: str) -> None:
    if choice not in ATTENTION:
        raise LowbitError(f"unknown {option} {choice!r}; choose from {', '.join(ATTENTION)}")


def _native_asked(option: str, choice: str, unavailable: str | None) -> bool:
    """Whether a native kernel may run for `option` ("auto" or "native" where it is available); asking for
    "native" where it is not is an error that says why."""
    if choice == "native" and unavailable:
        raise LowbitError(f"{option}='native' is not available here: {unavailable}")
    return unavailable is None and choice != "reference"


class Decoder(nn.Module):
    """The whole model as blocks over a static cache; `forward` returns the logits of the last position.

    attention: how a decoded token attends to the cache. "reference": the model's own call
    (scaled_dot_product_attention in the cache's dtype), bit-equal to the model's forward. "native": lowbit's CPU
    kernel (kernels.native_attention: float32 arithmetic from the cache's values, equal to the reference to the
    dtype's rounding). "auto": native on a CPU where the kernels are built (for a 16-bit cache the reference
    multiplies bfloat16 through MKL, whose reference code runs on AMD CPUs: 30% of a decode step of the default
    model on an AMD EPYC; for a float32 one it calls MKL's GEMV per head, 1.5-2x the kernel's time), the reference
    otherwise (GPUs, float64). Prompts always run the reference's call."""

    def __init__(self, model: nn.Module, max_len: int, kv_bits: int | None = None, kv_group_size: int | None = None,
                 kv_offload: bool = False, kv_key_group: int | None = None, attention: str = "auto",
                 dense: str = "auto"):
        super().__init__()
        _check_choice("attention", attention)
        _check_choice("dense", dense)
        self.kv_bits, self.kv_group_size, self.kv_offload = kv_bits, kv_group_size, kv_offload
        self.kv_key_group = kv_key_group
        config = model.config
        arch = arch_for(config)
        names = arch.decoder
        # per-layer windows and rotary tables where the family defines them (config.layer_types); one table else
        types = list(config.layer_types) if names.layer_types else [None] * config.num_hidden_layers
        self.rope_types = list(dict.fromkeys(types))
        self.rope_of = [self.rope_types.index(t) for t in types]
        windows = [config.sliding_window if t == "sliding_attention" else None for t in types]
        if not names.layer_types and getattr(config, "sliding_window", None) \
                and getattr(config, "use_sliding_window", True) and max_len > config.sliding_window:
            raise LowbitError(f"the engine does not implement sliding-window attention; max length {max_len} "
                              f"exceeds the window {config.sliding_window}")
        get = model.get_submodule
        self.embed = get(arch.embed)
        self.norm = (OffsetRMSNorm if names.norm_offset else RMSNorm)(get(arch.final_norm))
        self.lm_head = get(arch.lm_head)
        # under a memory budget (lowbit.offload) nothing is fused: streamed blocks have their tensors swapped in
        # around each call, and a fused copy of a resident quantized block would hold its weights twice. The
        # streaming state travels on the model (`model.lowbit_streaming`, set by offload.install_streaming)
        streaming = streaming_of(model)
        self.streamed = set(streaming.plan.streamed) if streaming is not None else set()
        self.blocks = nn.ModuleList(DecoderBlock(b, names, config, fuse=streaming is None, window=w)
                                    for b, w in zip(get(arch.blocks), windows))
        for i in self.streamed:
            streaming.hook(self.blocks[i], i, block=get(arch.blocks)[i])
        self.rotary = get(arch.rotary)
        self.resize(max_len)
        dtype, device = self._activations()
        use = _native_asked("attention", attention, native_attention.unavailable(dtype, device))
        for block in self.blocks:
            block.native_attention = use
        if _native_asked("dense", dense, native_dense.unavailable(dtype, device)):
            self._native_dense(dtype)

    def _native_dense(self, dtype: torch.dtype) -> None:
        """The decoder's own references to plain Linears in dtype (the lm_head, o, down, the unfused parts of q/k/v
        and gate/up, and a mixture's experts where the decoder runs them itself) run through NativeDense; the
        model's modules are left as they are."""
        def wrap(m):
            plain = type(m) is nn.Linear and m.weight.dtype == dtype
            return NativeDense(m) if plain else m
        self.lm_head = wrap(self.lm_head)
        for block in self.blocks:
            block.o = wrap(block.o)
            if block.moe is None:
                block.down = wrap(block.down)
            for fused in (block.qkv, getattr(block, "gate_up", None), block.experts_gate_up):
                if isinstance(fused, _Concat):
                    for i, m in enumerate(fused.parts):
                        fused.parts[i] = wrap(m)
            if block.experts_gate_up is not None:   # the experts run by _experts_dense: their downs too
                block.experts_down = nn.ModuleList(wrap(e.down_proj) for e in block.experts)

    def _activations(self) -> tuple[torch.dtype, torch.device]:
        """The hidden states' and the cache's dtype, and the compute device: the embedding's."""
        if isinstance(self.embed, QuantEmbedding):   # a packed table: lookups dequantize only their rows
            return self.embed.dtype, self.embed.qweight.device
        return self.embed.weight.dtype, self.embed.weight.device

    def resize(self, max_len: int) -> None:
        """(Re)allocate the cache and the rotary tables for max_len positions."""
        dtype, device = self._activations()
        positions = torch.arange(max_len, device=device)
        # the model's own rotary module gives the exact cos/sin the reference uses (any rope scaling included),
        # one table per layer type where the family has several (Gemma 3: local and global rope bases)
        x = torch.empty(0, dtype=dtype, device=device)
        tables = [self.rotary(x, positions.unsqueeze(0), *([t] if t else [])) for t in self.rope_types]
        self.register_buffer("cos", torch.stack([c[0] for c, _ in tables]), persistent=False)  # [types, max_len, head_dim]
        self.register_buffer("sin", torch.stack([s[0] for _, s in tables]), persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        blk = self.blocks[0]
        where = "cpu" if self.kv_offload else device
        if self.kv_key_group is not None:
            cache = ChannelKeyKVCache(len(self.blocks), blk.kv_heads, max_len, blk.head_dim, dtype, where,
                                      self.kv_bits, self.kv_group_size, self.kv_key_group)
        else:
            cache = StaticKVCache(len(self.blocks), blk.kv_heads, max_len, blk.head_dim, dtype, where,
                                  self.kv_bits, self.kv_group_size)
        self.cache = HostKVCache(cache, compute_device=device) if self.kv_offload else cache
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """ids: [1, T] token ids placed at cache positions pos ([T], consecutive). Returns logits [1, vocab]
        of the last position. visible=None: a prefill from position 0 (attention over the new keys, causal).
        Otherwise one new token (T = 1) that attends to the first visible.shape[0] cache positions; the count
        travels as a tensor's length so that a compiled step treats it as a symbolic size, not a constant.
        all_logits: return [1, T, vocab] instead."""
        h = self.embed(ids)   # the model's own embedding module (Gemma's scales by sqrt(hidden))
        rope = [(self.cos[j][pos].unsqueeze(0), self.sin[j][pos].unsqueeze(0)) for j in range(len(self.rope_types))]
        n = None if visible is None else visible.shape[0]
        for i, block in enumerate(self.blocks):
            h = block(h, *rope[self.rope_of[i]], self.cache, i, pos, n)
        if all_logits:   # [1, T, vocab], for perplexity
            return self.lm_head(self.norm(h))
        return self.lm_head(self.norm(h[:, -1:]))[:, -1]
