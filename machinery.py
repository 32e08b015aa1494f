"""
machinery.py -- what makes prerl.py faster, smaller or wider, kept out of the method's way.

prerl.py reads as the method, top to bottom. Everything here only changes how fast it runs, how much
memory it takes or how many devices it spans: never what it computes. Each part is reached from
prerl.py through one call, and each has a plain counterpart there: `python prerl.py --plain` (or
PRERL_PLAIN=1 in the environment) runs the method exactly as written in prerl.py, without any of this,
and test_prerl.py checks that both paths agree (values, gradients, sampled distributions).

This module never imports prerl (prerl.py may run as __main__; a second import would make a second
copy of it): whatever a part needs from the method comes in as an argument.

Parts, in the order prerl.py reaches them:
    Speed: KV cache            preallocate(cache, room)      sampling writes one position per token
                                                             instead of torch.cat-ing the whole cache
    Speed: LM-head log-probs   lm_head_logprobs(...)         chunked vocabulary projection with a
                                                             hand-written backward: no [tokens, vocab]
                                                             logits or log-softmax copies kept
    Memory: allocator          reuse_freed_memory(device)    glibc keeps freed blocks for reuse instead
                                                             of page-faulting them in per micro-batch
    GPU decode                 static_generate(...)          on CUDA: a static KV cache and the one-token
                                                             step replayed as a CUDA graph
"""

import ctypes
import os
import sys
import time
import weakref

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

# -----------------------------------------------------------------------------
# Speed: KV cache
# transformers' DynamicLayer appends each decoded token with torch.cat, which copies the entire cache
# every step: on CPU up to a fifth of sampling time, mostly page faults on the fresh copies. The plain
# path (prerl.generate with PLAIN) keeps DynamicLayer; here each layer gets buffers with room for the
# whole response, and a step writes one position. Same keys and values, so the same logits.


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers with room for the whole response. A row drop copies once."""

    def __init__(self, keys, values, room):
        super().__init__()
        self.device, self.is_initialized, self.length = keys.device, True, keys.shape[-2]
        self.key_buffer = torch.cat([keys, keys.new_empty(*keys.shape[:2], room, keys.shape[-1])], -2)
        self.value_buffer = torch.cat([values, values.new_empty(*values.shape[:2], room, values.shape[-1])], -2)
        self.show_filled()

    def show_filled(self):
        """keys/values, which attention reads, are views of the buffers' filled positions."""
        self.keys, self.values = self.key_buffer.narrow(2, 0, self.length), self.value_buffer.narrow(2, 0, self.length)

    def update(self, key_states, value_states, *args, **kwargs):
        added = key_states.shape[-2]
        self.key_buffer.narrow(2, self.length, added).copy_(key_states)      # narrow: cheaper than [:, :, a:b]
        self.value_buffer.narrow(2, self.length, added).copy_(value_states)  # in a loop bound by Python time
        self.length += added
        self.show_filled()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.show_filled()


def preallocate(cache, room):
    """Swap each plain DynamicLayer of a prefilled cache for a PreallocatedLayer; other layer kinds
    (sliding windows, linear attention) keep their own update rule."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, room)


# -----------------------------------------------------------------------------
# Speed: LM-head log-probs
# The plain path computes logits = lm_head(hidden) for the whole micro-batch and takes log_softmax;
# autograd then keeps the [tokens, vocab] logits, a shifted copy for the log-softmax and a one-hot
# scatter of the same size (V is 49k-152k). Here the projection runs in chunks of positions; with
# gradients each chunk keeps only its softmax (overwriting its logits in place), and without
# gradients nothing of size [tokens, vocab] outlives a chunk.


def at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32; fp32, fp64 unchanged


class LinearLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] for one chunk of tokens, with a hand-written backward.
    Recomputing the logits instead (checkpointing) would run the LM head twice. Here the logits are made
    once and overwritten in place by the softmax that the backward needs:
    d lp / d logits = onehot(target) - softmax(logits)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        compute_dtype = logits.dtype                                  # bf16 under autocast, else fp32
        logits = at_least_fp32(logits)                                # the log-softmax itself in fp32
        target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)
        row_max = logits.amax(-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()                           # in place: no second [chunk, V] tensor
        row_sum = probs.sum(-1, keepdim=True)
        probs.div_(row_sum)
        ctx.save_for_backward(hidden, weight, targets, probs.to(compute_dtype))
        ctx.has_bias, ctx.used = bias is not None, False
        return target_logits - (row_max + row_sum.log()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_lp):
        if ctx.used:
            raise RuntimeError("LinearLogprobs: its backward reuses the saved softmax in place and runs only once")
        ctx.used = True
        hidden, weight, targets, probs = ctx.saved_tensors
        grad_lp = grad_lp.to(probs.dtype)[:, None]
        grad_logits = probs.mul_(-grad_lp).scatter_add_(1, targets[:, None], grad_lp)  # g * (onehot - softmax)
        grad_hidden = (grad_logits @ weight.to(probs.dtype)).to(hidden.dtype)
        grad_weight = (grad_logits.T @ hidden.to(probs.dtype)).to(weight.dtype)
        grad_bias = grad_logits.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None


def chunk_logprobs(hidden, weight, bias, targets):
    """log P(targets) under the LM head for one chunk of positions, in fp32."""
    if torch.is_grad_enabled():
        return LinearLogprobs.apply(hidden, weight, bias, targets)
    logits = at_least_fp32(torch.nn.functional.linear(hidden, weight, bias))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def lm_head_logprobs(hidden, lm_head, targets, autocast, chunk_tokens=256):
    """log P(targets) [B, T] in fp32 from the last hidden states [B, T, H], chunk by chunk.
    `autocast` is the caller's autocast context (bf16 on CUDA)."""
    batch, length = targets.shape
    hidden = hidden.reshape(batch * length, -1)
    flat_targets = targets.reshape(-1)
    parts = []
    with autocast:
        for i in range(0, batch * length, chunk_tokens):
            chunk = slice(i, i + chunk_tokens)
            parts.append(chunk_logprobs(hidden[chunk], lm_head.weight, lm_head.bias, flat_targets[chunk]))
    return torch.cat(parts).view(batch, length)


# -----------------------------------------------------------------------------
# Memory: allocator
# glibc maps every block over 32 MB (a [vocab, width] gradient, a chunk of logits) afresh and returns
# it to the OS when freed, so each micro-batch page-faults those blocks in again: 13% of a nsr-prerl
# training step of SmolLM2-135M on CPU, with the same peak memory either way. PyTorch's CPU tuning
# guide gives the same advice (jemalloc, tcmalloc); this is it without a new dependency.


def reuse_freed_memory(device):
    """Let glibc's malloc keep freed memory for reuse. Process-wide; returns whether it was set.
    A no-op off Linux/glibc and on GPUs."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):                          # not glibc (musl, ...): leave malloc alone
        return False


# -----------------------------------------------------------------------------
# Precision: bf16 weights and stochastic rounding (issue 15)


# -----------------------------------------------------------------------------
# Memory: plan and LoRA (issue 15)


# -----------------------------------------------------------------------------
# GPU decode: static KV cache and a captured decode step (issue 11)
# On a GPU, prerl.generate's loop is bound by Python and kernel launches: about 30 ms per token for a
# 1.5B model at 32 rows, where streaming its bf16 weights once takes about 1 ms. Here the whole one-token
# step -- forward, prerl's pick_next_token, bookkeeping -- has fixed shapes and reads and writes only
# device buffers, so it is recorded once as a CUDA graph and replayed: one launch per token.
#   KV cache    transformers' StaticCache: per layer [rows, kv heads, room, head dim], allocated once.
#               Prompts are left-padded, so every row writes its t-th response token at the same slot P + t
#               (a device counter that the step itself advances); the causal mask hides later slots.
#   rows        finished rows keep decoding pad (their picks are replaced by pad_id), so no shape changes;
#               "all done?" is read every CHECK_EVERY steps (each read is a device sync).
#   weights     under bf16 autocast the graph would re-cast every fp32 weight at every token (4 bytes read,
#               2 written, 2 read again, instead of 2). It reads bf16 copies of the matmul weights instead,
#               refreshed from the fp32 weights at the start of each rollout: the values autocast would make.
#   reuse       the graph is kept per model and reused by later rollouts of the same shape (rows, room, new
#               tokens, temperature, top-p, EOS, pad); room is P + T rounded up to ROOM_MULTIPLE, so steps
#               whose prompts differ a little in length share one graph.
#   validity    weights updated in place (the optimizer, load_state_dict's copy) keep the graph valid. What
#               gives a parameter new storage or dtype invalidates it -- load_state_dict(assign=True),
#               model.to(dtype or device), FSDP resharding, swapping modules (merging LoRA adapters) -- so
#               each rollout compares every parameter's address and dtype with those seen at capture and
#               builds a new graph when one differs.
# Hand-captured torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"): the warm-up is two
# eager steps and one capture (well under a second, no Inductor compile), and the captured Python function
# is exactly the one the CPU tests run (capture=False). If capture fails, the rollout goes on eagerly with
# the same static buffers and DECODE_STATS["capture_failures"] says so.

STATIC_DECODE = os.environ.get("PRERL_STATIC_DECODE", "auto")  # auto (on CUDA only) | on | off
CHECK_EVERY = 8        # decode steps between "all rows done?" reads
ROOM_MULTIPLE = 128    # the KV buffers' length, P + T rounded up to this, so nearby prompt lengths share a graph
KEEP_DECODERS = 2      # graphs kept per model (a training shape and an evaluation shape)
DECODE_STATS = {"captures": 0, "capture_s": 0.0, "replays": 0, "eager_steps": 0, "graph_reuses": 0,
                "rebuilds_after_weight_change": 0, "capture_failures": 0}
_DECODERS = weakref.WeakKeyDictionary()   # model -> {shape key: StaticDecoder}; dies with the model


def static_decode_fits(model, device):
    """Whether prerl.generate takes the static path: by default on CUDA only (PRERL_STATIC_DECODE=on forces
    it, =off disables it), and only for models whose every layer is full attention (no sliding windows,
    no linear-attention layers: those keep today's loop)."""
    if STATIC_DECODE == "off" or (STATIC_DECODE == "auto" and device.type != "cuda"):
        return False
    from transformers import StaticCache
    layers = StaticCache(config=model.config, max_cache_len=1).layers   # lazy: allocates nothing
    return len(layers) > 0 and all(type(layer) is StaticLayer for layer in layers)


def weights_signature(model):
    return [(t.data_ptr(), t.dtype, t.device) for t in list(model.parameters()) + list(model.buffers())]


class StoringLayer(StaticLayer):
    """transformers' StaticLayer, storing new states in the dtypes of the prefilled cache. Under autocast the
    loop's DynamicCache holds keys in fp32 (RoPE's fp32 cos/sin promote them), values in bf16 with
    transformers 5.24 and in fp32 with 5.17 (its torch.cat promotes them); the static buffers take those
    dtypes, and this cast is the loop's own promotion (a no-op where the dtypes already agree)."""

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states.to(self.keys.dtype), value_states.to(self.values.dtype), *args, **kwargs)


class StaticDecoder:
    """The device buffers of one rollout shape and the one-token decode step over them, as a CUDA graph
    (capture=True) or run eagerly. Holds no reference to the model (the model is passed in each call)."""

    def __init__(self, model, rows, room, max_new_tokens, temperature, top_p, eos_ids, pad_id, pick_next_token,
                 cache_name, device, capture, autocast_dtype):
        from transformers import StaticCache
        self.cache = StaticCache(config=model.config, max_cache_len=room)
        self.cache.layers = [StoringLayer(max_cache_len=room) for _ in self.cache.layers]   # all full attention
        self.settings = dict(temperature=temperature, top_p=top_p)
        self.pick_next_token, self.cache_name, self.pad_id, self.device = pick_next_token, cache_name, pad_id, device
        self.capture, self.graph, self.signature = capture, None, weights_signature(model)
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(rows, **long)                   # the token fed to the next step
        self.position = torch.zeros(rows, 1, **long)             # its position id (from the prompt mask)
        self.mask = torch.ones(rows, room, dtype=torch.bool, device=device)   # prompt padding, then all ones
        self.t = torch.zeros(1, **long)                          # index of the response token the step picks
        self.uniforms = torch.zeros(rows, max_new_tokens, dtype=torch.float64, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.responses = torch.full((rows, max_new_tokens), pad_id, **long)
        self.eos = torch.tensor(eos_ids, **long)
        # Under low-precision autocast: low-precision copies of the matmul weights (and biases) for the step
        self.autocast_dtype = autocast_dtype
        self.shadow = {}
        if self.autocast_dtype is not None and self.autocast_dtype != torch.float32:
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    for kind, p in (("weight", module.weight), ("bias", module.bias)):
                        if p is not None and p.dtype == torch.float32:
                            self.shadow[f"{name}.{kind}" if name else kind] = torch.empty_like(p, dtype=self.autocast_dtype)

    def load(self, model, prefill_cache, group_size, prompt_mask, first_token, next_position, uniforms):
        """Start a rollout: the prefilled prompt KV (each prompt's copied to its G rows), the first token,
        positions, padding and random numbers, all copied into the existing buffers."""
        prompt_length = prompt_mask.shape[1]
        for static, prefilled in zip(self.cache.layers, prefill_cache.layers):
            if not static.is_initialized:            # first rollout: allocate [rows, heads, room, dim] buffers
                rows = len(self.token)                 # (it reads only their shapes, dtype and device)
                static.lazy_initialization(prefilled.keys[:1].expand(rows, -1, -1, -1),
                                           prefilled.values[:1].expand(rows, -1, -1, -1))
                if static.values.dtype != prefilled.values.dtype:   # transformers 5.17 uses the keys' dtype
                    static.values = torch.zeros_like(static.values, dtype=prefilled.values.dtype)
            for buffer, states in ((static.keys, prefilled.keys), (static.values, prefilled.values)):
                rows, heads, _, dim = buffer.shape   # view [prompts, G, ...]: one broadcast copy, no repeat
                buffer[:, :, :prompt_length].view(rows // group_size, group_size, heads, prompt_length, dim).copy_(states[:, None])
            static.cumulative_length.fill_(prompt_length)
        self.mask[:, :prompt_length].copy_(prompt_mask.repeat_interleave(group_size, 0).bool())
        self.mask[:, prompt_length:].fill_(True)
        self.token.copy_(first_token)
        self.position.copy_(next_position)
        self.t.fill_(1)
        if uniforms is not None:                     # greedy rollouts have none; the step then ignores u
            self.uniforms.copy_(uniforms)
        self.responses.fill_(self.pad_id)
        self.responses[:, 0] = first_token
        self.done.copy_(torch.isin(first_token, self.eos))
        named = dict(model.named_parameters(remove_duplicate=False))
        for name, copy in self.shadow.items():
            copy.copy_(named[name])                   # the values autocast's cast would give, once per rollout

    def forward(self, model):
        inputs = {"input_ids": self.token[:, None], "attention_mask": self.mask, "position_ids": self.position,
                  "use_cache": True, self.cache_name: self.cache}
        if self.autocast_dtype is None:
            return model(**inputs).logits[:, -1]
        # autocast's cache of cast weights must stay out of a graph: a replay would read a copy freed long ago
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False):
            if not self.shadow:
                return model(**inputs).logits[:, -1]
            return torch.func.functional_call(model, self.shadow, (), inputs, tie_weights=False, strict=False).logits[:, -1]

    def step(self, model):
        """Feed the last token, pick the next: column t of every row (pad for rows already done). Reads and
        writes only the buffers above, so it can be recorded once and replayed."""
        logits = self.forward(model)
        u = self.uniforms.index_select(1, self.t).squeeze(1)
        picked = self.pick_next_token(logits, self.settings["temperature"], self.settings["top_p"], u)
        picked = torch.where(self.done, self.pad_id, picked)
        self.responses.index_copy_(1, self.t, picked[:, None])
        self.done |= (picked[:, None] == self.eos).any(1)   # not isin: its sorting path can sync
        self.token.copy_(picked)
        self.position.add_(1)
        self.t.add_(1)

    def record(self, model):
        """Two eager steps on a side stream (real steps: they advance the rollout), then record the third
        (recording runs nothing) and replay it. Returns the number of steps taken."""
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model)
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(model)
        except Exception as e:       # report, never hide; the rollout goes on eagerly on the same buffers
            DECODE_STATS["capture_failures"] += 1
            print(f"machinery: CUDA graph capture failed, decoding eagerly ({type(e).__name__}: {e})"[:300])
            self.capture = False
            return 2
        torch.cuda.synchronize()
        DECODE_STATS["captures"] += 1
        DECODE_STATS["capture_s"] += time.perf_counter() - start
        self.graph = graph
        graph.replay()
        DECODE_STATS["replays"] += 1
        return 3

    def run(self, model, max_new_tokens):
        """Decode response tokens 1 .. T-1; returns the responses up to the longest one (as prerl.generate)."""
        t = 1
        while t < max_new_tokens:
            if self.graph is not None:
                self.graph.replay()
                DECODE_STATS["replays"] += 1
                taken = 1
            elif self.capture and max_new_tokens - t >= 3:
                taken = self.record(model)
            else:
                self.step(model)
                DECODE_STATS["eager_steps"] += 1
                taken = 1
            t += taken
            if t % CHECK_EVERY == 0 and bool(self.done.all()):
                break
        is_eos = torch.isin(self.responses, self.eos)
        ended = is_eos.any(1)
        width = int(is_eos.float().argmax(1).max()) + 1 if bool(ended.all()) else max_new_tokens
        return self.responses[:, :width].clone()     # the buffers belong to the next rollout


def static_decoder(model, key, make):
    """The model's decoder for this shape: reused while the weights keep their storage, else rebuilt."""
    decoders = _DECODERS.setdefault(model, {})
    decoder = decoders.get(key)
    if decoder is not None and decoder.signature != weights_signature(model):
        DECODE_STATS["rebuilds_after_weight_change"] += 1
        decoder = None
    if decoder is None:
        if len(decoders) >= KEEP_DECODERS:
            decoders.pop(next(iter(decoders)))       # the oldest shape goes (its buffers and graph with it)
        decoder = decoders[key] = make()
    else:
        DECODE_STATS["graph_reuses"] += 1
    return decoder


@torch.no_grad()
def static_generate(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, top_p, eos_ids, pad_id,
                    uniforms, pick_next_token, autocast, cache_name, capture=None):
    """prerl.generate on a static KV cache with a fixed-shape decode step (a CUDA graph on CUDA, eager
    elsewhere or with capture=False). Same prefill, same uniforms u[row, t], same pick_next_token (passed
    in: this module never imports prerl), so the same tokens and the same response widths."""
    device = prompt_ids.device
    capture = device.type == "cuda" if capture is None else capture
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    rows, prompt_length = len(prompt_ids) * group_size, prompt_ids.shape[1]
    room = -(-(prompt_length + max_new_tokens) // ROOM_MULTIPLE) * ROOM_MULTIPLE
    with autocast:                                     # the prefill and the first pick exactly as prerl.generate
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].repeat_interleave(group_size, 0)
        first = pick_next_token(logits, temperature, top_p, None if uniforms is None else uniforms[:, 0])
        autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # Past this point autocast's cache of cast weights is gone; the step sets up its own autocast, uncached
    if max_new_tokens == 1 or bool(torch.isin(first, torch.tensor(eos_ids, device=device)).all()):
        return first[:, None]
    key = (rows, room, max_new_tokens, temperature, top_p, tuple(eos_ids), pad_id, pick_next_token, capture, autocast_dtype)
    decoder = static_decoder(model, key, lambda: StaticDecoder(model, rows, room, max_new_tokens, temperature, top_p, eos_ids,
                                                               pad_id, pick_next_token, cache_name, device, capture,
                                                               autocast_dtype))
    next_position = positions[:, -1:].repeat_interleave(group_size, 0) + 1
    decoder.load(model, getattr(out, cache_name), group_size, prompt_mask, first, next_position, uniforms)
    del out, logits                                    # the prefill's own cache is no longer needed
    return decoder.run(model, max_new_tokens)


# -----------------------------------------------------------------------------
# Distribution: torchrun + FSDP2 (issue 12)
