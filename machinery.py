"""
machinery.py -- what makes prerl.py faster, smaller or wider, kept out of the method's way.

prerl.py reads as the method, top to bottom. Everything here only changes how fast it runs, how much
memory it takes or how many devices it spans: never what it computes. Each part is reached from
prerl.py through one call, and each has a plain counterpart there: `python prerl.py --plain` (or
PRERL_PLAIN=1 in the environment) runs the method exactly as written in prerl.py, without any of this,
and test_machinery.py checks that both paths agree (values, gradients, sampled distributions).

This module never imports prerl (prerl.py may run as __main__; a second import would make a second
copy of it): whatever a part needs from the method comes in as an argument.

Parts, in the order prerl.py reaches them:
    Speed: KV cache            preallocate(cache, room)      sampling writes one position per token
                                                             instead of torch.cat-ing the whole cache
    Speed: packed bf16 weights packed_bf16_linears(model)    a CPU rollout in bf16 packs each Linear's
                                                             weight once instead of at every matmul
    Speed: shared prompts      shared_prompt_logprobs(...)   conditional scoring runs each distinct prompt
                                                             once and its responses on its KV cache
    Speed: LM-head log-probs   lm_head_logprobs(...)         chunked vocabulary projection with a
                                                             hand-written backward: no [tokens, vocab]
                                                             logits or log-softmax copies kept
    Memory: allocator          reuse_freed_memory(device)    glibc keeps freed blocks for reuse instead
                                                             of page-faulting them in per micro-batch
    Precision                  choose_precision(...),        bf16 weights and moments, AdamW in fp32 with
                               StochasticRoundingAdamW       stochastic rounding back to bf16 (--precision)
    Memory: plan and LoRA      memory_plan(...), add_lora()  the peak estimated before loading; adapters only
                                                             train under --lora (peft, optional)
    GPU decode                 static_generate(...)          on CUDA: a static KV cache and the one-token
                                                             step replayed as a CUDA graph
    Distribution               init_distributed(device) ...  torchrun + FSDP2: each rank a share of the
                                                             prompts and of the weights, the same result
                                                             as one process (only when WORLD_SIZE > 1)
"""

import contextlib
import copy
import ctypes
import functools
import inspect
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass

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
# Speed: bf16 weights packed once per rollout (CPU)
# On a CPU a bf16 matmul goes through oneDNN, which lays the weight out afresh for the AMX tiles on every
# call; for decoding's few rows that relayout costs more than the product (one thread, a [1536, 576]
# projection of 32 rows: 243 us as F.linear, 176 us packed; the [49152, 576] LM head 15.2 against 6.6 ms).
# A rollout does not change the weights, so each bf16 Linear is packed once as sampling starts
# (torch.ops.mkldnn._reorder_linear_weight, as inductor's freezing pass does) and calls the packed
# product until it ends: bit-equal to F.linear (checked on the first layer; a CPU where it is not keeps
# F.linear), so the same tokens are sampled. fp32 is left as it is:
# MKL's packed sgemm is faster there but not bit-equal, and what is sampled must not depend on this.


def packed_linear(weight, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def packed_bf16_linears(model):
    """Inside the block (no gradients), every bf16 CPU nn.Linear of the model multiplies by its weight
    packed once; outside, the modules are as they were."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)
               and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"]
    if not (linears and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        yield
        return
    with torch.no_grad():
        packed = [torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None) for module in linears]
        first = linears[0]                       # a CPU whose packed product is not F.linear's keeps F.linear
        x = torch.randn(5, first.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        if not torch.equal(packed_linear(packed[0], first.bias, x), torch.nn.functional.linear(x, first.weight, first.bias)):
            linears = []
        for module, weight in zip(linears, packed):
            module.forward = functools.partial(packed_linear, weight, module.bias)   # shadows the class's forward
        try:
            yield
        finally:
            for module in linears:
                del module.forward


# -----------------------------------------------------------------------------
# Speed: one forward per distinct prompt
# GRPO scores the G responses of a prompt in the conditional space, and the plain path runs prompt +
# response for every row: each prompt's forward and backward run G times. Here each distinct prompt of a
# micro-batch runs once with its KV cache kept; the cache's rows are picked per response (an index, so
# the backward adds the responses' gradients into the one prompt pass) and the responses run on top, at
# the positions and under the mask the plain path gives them. The same numbers up to float rounding.
# Two passes of fewer rows run the matmuls less efficiently, so this pays only on micro-batches of several
# responses per prompt (SmolLM2-135M, 40-token prompts, 64-token responses, forward+backward on 2 cores:
# 16 rows of 4 prompts 20% faster in fp32 and 13% in bf16; 4 rows of one prompt 10% faster in fp32, 5%
# slower in bf16; 2 rows slower in both), and only there it is taken: at least SHARE_MIN_ROWS rows, two per
# distinct prompt on average. Not under torchrun (FSDP2 would meet two forwards per pass where
# match_passes counts one), nor with activation checkpointing (transformers turns the cache off there).
SHARE_MIN_ROWS = 8


def shared_prompt_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, dist, autocast, cache_name,
                           token_logprobs):
    """log P(response_t | prompt, response_<t) [B, T] in fp32, as token_logprobs(model, prompt + response, ...)
    computes it (and calls it where sharing does not apply): each distinct left-padded prompt run once.
    cache_name: the forward's keyword for the KV cache (prerl.cache_keyword)."""
    length = prompt_ids.shape[1]
    prompts = inverse = None
    if dist is None and len(prompt_ids) >= SHARE_MIN_ROWS and not any(
            getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        prompts, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    if prompts is None or 2 * len(prompts) > len(prompt_ids):
        return token_logprobs(model, torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1),
                             response_ids, length)
    base = model.base_model
    ids, mask = prompts[:, :length], prompts[:, length:]
    both_mask = torch.cat([prompt_mask, response_mask], 1)
    positions = (both_mask.cumsum(-1) - 1).clamp(min=0)          # as prerl.last_hidden_states numbers them
    with autocast:
        prompt_out = base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = getattr(prompt_out, cache_name)
        cache.batch_select_indices(inverse)                      # each response's row of its prompt's cache
        hidden = base(input_ids=response_ids, attention_mask=both_mask, position_ids=positions[:, length:],
                      use_cache=True, **{cache_name: cache}).last_hidden_state
    # the prompt's last position predicts the response's first token; response position t, token t + 1
    hidden = torch.cat([prompt_out.last_hidden_state[inverse, -1:], hidden[:, :-1]], 1)
    return lm_head_logprobs(hidden, model.get_output_embeddings(), response_ids, autocast)


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
        grad_weight = None                       # a frozen head (LoRA) needs no [vocab, width] gradient
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ hidden.to(probs.dtype)).to(weight.dtype)
        grad_bias = grad_logits.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
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
# Precision: bf16 weights and stochastic rounding
# bf16 keeps 8 significant bits: a weight of 0.02 sits on a grid of 1.2e-4, so an AdamW update of
# lr = 1e-6 is ~60x smaller than half a step and round-to-nearest drops it -- nothing trains, silently.
# Here the optimizer does its arithmetic in fp32 and writes the new weight back to bf16 rounding up
# with probability equal to the dropped fraction: each update survives in expectation. The moments are
# bf16 too (4 bytes/param of state), rounded the same way so their running averages stay unbiased
# (beta2 = 0.999 moves v by 0.1% a step, below half a bf16 step, so nearest rounding would freeze it).
# Weights 2 + gradients 2 + moments 4 = 8 bytes per parameter, against 16 for fp32 AdamW.
# The rounding's random bits are counter-based: a hash of the run's seed, the parameter's step and its
# index in the optimizer (splitmix64's finaliser, once per tensor), then per element a 32-bit hash
# (lowbias32) of that key and the element's index. Nothing is drawn from a
# generator, so there is no generator state to save and a resumed run rounds exactly as an
# uninterrupted one by construction; and the bits are a pure function of the element, so they are
# computed beside the arithmetic, on every core. On the CPU the update is one pass over each tensor
# in C++ (ADAMW_BF16_CPP, built once): it reads 8 bytes per parameter (bf16 weight, gradient and
# moments) and writes 6, where the generator-based version drew 3 x 16 random bits per element on one
# thread and streamed fp32 temporaries through memory op by op (23x the fused fp32 AdamW on
# SmolLM2-135M). torch.compile fuses the loop too, but scalarises the float <-> int bit casts the
# rounding needs and measured 3-4x slower than this kernel (docs/precision.md). The op-by-op torch
# form (adamw_update) is the reference the tests hold the kernel to, bit for bit, and the path
# wherever the kernel cannot build or run (no compiler, CUDA).
# The plain path of prerl.py trains in fp32 only (plain torch AdamW on bf16 weights is the silent
# failure above); the tests hold this optimizer against fp32 torch AdamW.

MIX = (-4658895280553007687, -7723592293110705685)  # splitmix64's multipliers 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


M32 = (1 << 32) - 1
WEYL32 = 0x9E3779B9                                  # 2^32 / golden ratio: consecutive elements far apart
LOWBIAS32 = (0x7FEB352D, 0x846CA68B)                 # lowbias32's multipliers (C. Wellons, hash-prospector)


def hash32(x):
    """lowbias32, a bijection of 32-bit integers with low bias (every input bit flips each output bit with
    probability ~1/2), on int64 tensors holding values in [0, 2^32): products are masked back to 32 bits.
    Half the cost of a 64-bit hash in the kernel: its multiplies are 32-bit lanes."""
    x = x ^ (x >> 16)
    x = (x * LOWBIAS32[0]) & M32
    x = x ^ (x >> 15)
    x = (x * LOWBIAS32[1]) & M32
    return x ^ (x >> 16)


def rounding_key(seed, step, index):
    """The key (an int64 value, as a Python int) of one parameter tensor's update: seed, optimizer step and
    the tensor's index hashed in turn with splitmix64's finaliser (Steele, Lea & Flood 2014), in Python
    integers (no tensor ops per parameter); it is a bijection, so another step or tensor gives another key."""
    wrap = (1 << 64) - 1

    def mix(z):                                   # on unsigned 64-bit values
        z = ((z ^ (z >> 30)) * (MIX[0] & wrap)) & wrap
        z = ((z ^ (z >> 27)) * (MIX[1] & wrap)) & wrap
        return z ^ (z >> 31)
    z = mix(mix(mix(seed & wrap) + step & wrap) + index & wrap)
    return z - (1 << 64) if z >= 1 << 63 else z


def element_bits(key, offset, count, device="cpu"):
    """48 random bits (in int64) for elements offset .. offset+count-1 of the tensor keyed `key`: bits 0-31
    are hash32 of the element's place in a Weyl sequence started at the key's low half, bits 32-47 hash32
    of those 32 bits xor the key's high half. Any chunking gives the same bits."""
    index = torch.arange(count, dtype=torch.int64, device=device) + offset
    low = hash32((index * WEYL32 + (key & M32)) & M32)
    high = hash32(low ^ ((key >> 32) & M32))
    return low | ((high & 0xFFFF) << 32)


def stochastic_round_to_bf16(x, bits):
    """fp32 -> bf16, rounding the magnitude up with probability equal to the dropped fraction of a bf16
    step. On the int32 view of the fp32 value: add 16 random low bits (a carry rounds up), truncate.
    bits: an integer tensor of x's shape holding the 16 bits in 0..65535, or a torch.Generator to draw them."""
    if isinstance(bits, torch.Generator):
        bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=bits)
    as_int = x.float().contiguous().view(torch.int32)
    return as_int.add(bits.to(torch.int32)).bitwise_and(-65536).view(torch.float32).to(torch.bfloat16)  # 0xFFFF0000


def adamw_update(weight, grad, exp_avg, exp_avg_sq, key, offset, decay, step_size, root_correction2, beta1, beta2, eps):
    """One AdamW update (torch.optim.AdamW's formula) of flat tensors, in fp32, written back in each
    tensor's dtype. bf16 ones are rounded stochastically with bits 0-15 (weight), 16-31 (first moment)
    and 32-47 (second moment) of element_bits; key None rounds them to nearest (the control that fails)."""
    g = grad.float()
    m = exp_avg.float() * beta1 + g * (1 - beta1)       # op by op, no fused multiply-adds (lerp, addcmul):
    v = exp_avg_sq.float() * beta2 + (g * g) * (1 - beta2)   # the C++ kernel then rounds as these ops do
    w = weight.float() * decay - step_size * (m / ((v.sqrt() / root_correction2) + eps))
    bits = None if key is None else element_bits(key, offset, weight.numel(), weight.device)
    for target, value, shift in ((weight, w, 0), (exp_avg, m, 16), (exp_avg_sq, v, 32)):
        if target.dtype == torch.bfloat16 and bits is not None:
            value = stochastic_round_to_bf16(value, (bits >> shift) & 0xFFFF)
        target.copy_(value)


ADAMW_BF16_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
// adamw_update in one pass for CPU bf16 tensors: the same fp32 operations in the same order (built with
// -ffp-contract=off, so no fused multiply-adds), the same hash32 bits. gcc vectorises the loop.
static inline uint32_t hash32(uint32_t x) {                                 // lowbias32, as hash32
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}
static inline float widen(uint16_t bf16) { uint32_t i = (uint32_t)bf16 << 16; float f; std::memcpy(&f, &i, 4); return f; }
static inline uint16_t round_up_if_carry(float x, uint32_t bits16) {        // stochastic_round_to_bf16
    uint32_t i; std::memcpy(&i, &x, 4); return (uint16_t)((i + bits16) >> 16);
}
void adamw_bf16(torch::Tensor weight, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                int64_t key, double decay, double step_size, double root_correction2, double beta1, double beta2, double eps) {
    uint16_t* w = (uint16_t*)weight.data_ptr(); const uint16_t* g = (const uint16_t*)grad.data_ptr();
    uint16_t* m = (uint16_t*)exp_avg.data_ptr(); uint16_t* v = (uint16_t*)exp_avg_sq.data_ptr();
    const float d = decay, s = step_size, r = root_correction2, b1 = beta1, b2 = beta2, e = eps;
    const float c1 = 1 - beta1, c2 = 1 - beta2;
    const uint32_t k_low = (uint32_t)((uint64_t)key & 0xFFFFFFFFull), k_high = (uint32_t)((uint64_t)key >> 32);
    at::parallel_for(0, weight.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
        #pragma omp simd
        for (int64_t i = begin; i < end; i++) {
            float gi = widen(g[i]);
            float mi = widen(m[i]) * b1 + gi * c1;
            float vi = widen(v[i]) * b2 + (gi * gi) * c2;
            float wi = widen(w[i]) * d - s * (mi / ((std::sqrt(vi) / r) + e));
            uint32_t low = hash32(k_low + (uint32_t)i * 0x9E3779B9u), high = hash32(low ^ k_high);   // element_bits
            w[i] = round_up_if_carry(wi, low & 0xFFFF);
            m[i] = round_up_if_carry(mi, low >> 16);
            v[i] = round_up_if_carry(vi, high & 0xFFFF);
        }
    });
}
"""


@functools.lru_cache(maxsize=None)
def adamw_bf16_kernel():
    """ADAMW_BF16_CPP built once (torch.utils.cpp_extension; cached on disk per CPU, ~1 min the first time),
    or None where it cannot be built here (no C++ compiler or ninja), with a note: the op-by-op path then."""
    import hashlib
    try:
        from torch.utils.cpp_extension import load_inline
        with open("/proc/cpuinfo") as f:                  # -march=native: one build per kind of CPU
            cpu = hashlib.sha256(f.read().split("\nflags")[1].split("\n")[0].encode()).hexdigest()[:10]
    except (OSError, IndexError, ImportError):
        cpu = "generic"
    try:
        return load_inline(f"prerl_adamw_bf16_{cpu}", cpp_sources=ADAMW_BF16_CPP, functions=["adamw_bf16"],
                           extra_cflags=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
                           + (["-march=native"] if cpu != "generic" else [])).adamw_bf16
    except Exception as e:
        print(f"note: bf16 AdamW op by op, slower (its one-pass C++ kernel did not build: {type(e).__name__}: "
              f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})", file=sys.stderr)
        return None


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's formula) for bf16 parameters: fp32 arithmetic, bf16 weights and moments
    written back with stochastic rounding (rounding="nearest" is the control that fails at small lr).
    fp32 parameters (LoRA adapters) get plain fp32 AdamW with fp32 moments. fused=True: the compiled
    update, one pass over each tensor; fused=False: the same formula op by op (the reference), in chunks
    so that its fp32 temporaries stay small next to a [vocab, width] embedding. Both round with the same
    counter-based bits; the seed is saved with the param groups."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, seed=0,
                 rounding="stochastic", chunk=1 << 22, fused=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rounding_seed=seed))
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"StochasticRoundingAdamW: rounding {rounding!r}: choose stochastic or nearest")
        self.rounding, self.chunk, self.fused = rounding, chunk, fused and rounding == "stochastic"

    def step(self):
        with torch.no_grad():                        # a block, not @torch.no_grad(): mutmut skips decorated methods
            kernel = adamw_bf16_kernel() if self.fused else None
            index = -1
            for group in self.param_groups:
                lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    index += 1                             # the tensor's place in the optimizer: part of its key
                    if p.grad is None:
                        continue
                    if not p.is_contiguous():
                        raise ValueError("StochasticRoundingAdamW: parameters must be contiguous")
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["step"] += 1
                    step = int(state["step"].item())
                    key = rounding_key(group["rounding_seed"], step, index) if self.rounding == "stochastic" else None
                    scalars = (1 - lr * decay, lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step))
                    flat = [t.detach().view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                    if kernel and p.device.type == "cpu" and all(t.dtype == torch.bfloat16 for t in flat):
                        kernel(*flat, key, *scalars, beta1, beta2, eps)   # it rounds the scalars to fp32, as below
                        continue
                    scalars = [torch.tensor(x, dtype=torch.float32, device=p.device) for x in scalars]
                    for offset in range(0, p.numel(), self.chunk):
                        adamw_update(*(t[offset:offset + self.chunk] for t in flat), key, offset, *scalars, beta1, beta2, eps)

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        state_dict.pop("rounding_rng", None)          # checkpoints of the generator-based rounding
        seeds = [group["rounding_seed"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, seed in zip(self.param_groups, seeds):
            group.setdefault("rounding_seed", seed)


# --precision auto: bf16 where the hardware has bf16 matmuls and a probe of the model's own step shows it
# clearly faster. A square-matmul probe is not what a step does (and its ratio swung from 3x quiet to
# 33x under load, flipping the choice); here the probe times a decode step, the forward+backward of a
# micro-batch and an optimizer update on a slice of the run's model shape, fp32 and bf16 interleaved.
# Without AMX (or CUDA) bf16 is not chosen at all: the decision then cannot depend on load.
PROBE_LAYERS = 2              # decoder layers in the probe's slice (its embedding and LM head are whole)
PROBE_DECODE_STEPS = 32       # decode steps per update in the probe's step estimate (tens of tokens per response)
BF16_STEP_MARGIN = 1.3        # bf16's estimated step must be this much faster; AMX measures ~2x or more


def cpu_has_amx_bf16():
    """True on a CPU with AMX-BF16 tiles that the OS has enabled (Xeon Sapphire Rapids and later)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags and getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)()


def probe_step_parts(model, optimizer, prompt, batch):
    """Seconds of (one decode step after the prompt's cache, forward+backward of batch, optimizer update)."""
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5
    with torch.no_grad():
        cache = getattr(model(prompt[:, :-1], use_cache=True), cache_name)
        start = time.perf_counter()
        model(prompt[:, -1:], use_cache=True, **{cache_name: cache})
        decode = time.perf_counter() - start
    start = time.perf_counter()
    model(batch, labels=batch).loss.backward()
    backward = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    update = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return decode, backward, update


def step_probe(config, rounds=3):
    """{precision: [decode step, forward+backward, optimizer update] seconds} on a slice of the model's
    shape (random weights; its embedding and LM head, PROBE_LAYERS decoder layers) on the CPU: 16 rows
    decoding one token after 47, a micro-batch of 2 x 64 tokens, fused fp32 AdamW against
    StochasticRoundingAdamW. Rounds alternate fp32 and bf16 (a busy spell slows both) and each figure is
    the fastest of `rounds` (round 0 warms up and builds the compiled update, uncounted)."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(config)
    config.num_hidden_layers = min(PROBE_LAYERS, config.num_hidden_layers)
    with torch.random.fork_rng():                 # the run's own random stream is left as it was
        torch.manual_seed(0)
        fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        prompt, batch = torch.randint(config.vocab_size, (16, 48)), torch.randint(config.vocab_size, (2, 64))
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16)}
    optimizers = {"fp32": torch.optim.AdamW(fp32.parameters(), lr=1e-5, fused=True),
                  "bf16": StochasticRoundingAdamW(models["bf16"].parameters(), lr=1e-5)}
    best = {precision: [math.inf] * 3 for precision in models}
    adamw_bf16_kernel()                           # built (once) before anything is timed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round in range(rounds + 1):
            for precision, model in models.items():
                parts = probe_step_parts(model, optimizers[precision], prompt, batch)
                if round:
                    best[precision] = [min(b, p) for b, p in zip(best[precision], parts)]
    finally:
        torch.set_num_threads(threads)
    return best


def probe_step_seconds(parts):
    """The probe's estimate of one RL step: PROBE_DECODE_STEPS decode steps, a forward+backward, an update."""
    decode, backward, update = parts
    return PROBE_DECODE_STEPS * decode + backward + update


@functools.lru_cache(maxsize=None)
def choose_precision(requested, device_type, distributed=False, shape="smollm2-135m"):
    """(precision, why) for --precision, decided (decide_precision) once per process."""
    return decide_precision(requested, device_type, distributed, shape)


def decide_precision(requested, device_type, distributed, shape):
    """(precision, why) for --precision. auto: bf16 on CUDA; on a CPU with AMX-BF16, bf16 if a probe of
    the model's step (shape: a MODEL_SHAPES name or a config folder) has it >= BF16_STEP_MARGIN faster;
    else fp32. Under torchrun auto stays fp32: the stochastic-rounding optimizer has not been tried on
    FSDP2's sharded parameters."""
    if requested != "auto":
        return requested, "--precision " + requested
    if distributed:
        return "fp32", "auto: fp32 under torchrun (bf16 with stochastic rounding is not yet tried on FSDP2)"
    if device_type == "cuda":
        return "bf16", "auto: CUDA (bf16 tensor cores)"
    if device_type != "cpu" or not cpu_has_amx_bf16():
        return "fp32", f"auto: fp32 ({device_type} without AMX-BF16: bf16 matmuls are not in hardware tiles here)"
    config = model_config(shape)
    parts = step_probe(config)
    step = {precision: probe_step_seconds(p) for precision, p in parts.items()}
    ratio = step["fp32"] / step["bf16"]
    ms = lambda i: f"{1000 * parts['fp32'][i]:.1f} / {1000 * parts['bf16'][i]:.1f} ms"
    return ("bf16" if ratio >= BF16_STEP_MARGIN else "fp32",
            f"auto: AMX-BF16; step probe fp32 / bf16 on {min(PROBE_LAYERS, config.num_hidden_layers)} of "
            f"{config.num_hidden_layers} layers: decode {ms(0)}, forward+backward {ms(1)}, update {ms(2)}; "
            f"step of {PROBE_DECODE_STEPS} tokens {step['fp32']:.2f} / {step['bf16']:.2f} s = {ratio:.2f}x "
            f"(bf16 needs >= {BF16_STEP_MARGIN}x)")


def run_precision(requested, device_type, distributed, shape, checkpoint=None):
    """(precision, why) for a run, decided once: resuming (checkpoint: the checkpoint's path), auto takes
    the precision the checkpoint trained in and never probes again (an explicit --precision that differs
    is refused when the weights load); otherwise choose_precision."""
    if requested == "auto" and checkpoint and not distributed and os.path.exists(checkpoint):
        try:
            state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
        except Exception:                         # unreadable: loading it says so, with the file's name
            return choose_precision(requested, device_type, distributed, shape)
        saved = state["config"].get("precision")
        if saved not in ("fp32", "bf16"):         # checkpoints that recorded "auto": their weights say
            saved = "bf16" if next(iter(state["model"].values())).dtype == torch.bfloat16 else "fp32"
        return saved, f"the checkpoint's ({checkpoint}; --resume never decides again)"
    return choose_precision(requested, device_type, distributed, shape)


# -----------------------------------------------------------------------------
# Memory: plan and LoRA
# The plan adds up, from the model's config alone (a meta-device model: shapes, no weights), what a run
# holds at its two peaks: sampling (weights, optimizer state, the KV cache of prompts x G rows, one
# decode step's [rows, vocab] softmax and float64 CDF) and training (weights, optimizer state,
# gradients, one micro-batch's saved activations, the LM head's saved softmax and fp32 chunk, the
# optimizer's temporaries). Activations per token and layer, as autograd saves them in a Llama-style
# layer with sdpa: each RMSNorm keeps its fp32 input and two outputs (4h + 2sh bytes, s = bytes per
# activation), attention 7 q-widths + 4 kv-widths (q and k before and after RoPE, k and v repeated for
# the heads, the output and its reshaped copy), the MLP 4 intermediate widths (gate, silu(gate), up,
# product). With gradient checkpointing each layer keeps only its input, and one layer is recomputed
# (plus its backward's scratch) at a time. Checked against a measured step in test_machinery.py and bench.py.

MODEL_SHAPES = {  # --model-config NAME: named shapes (bench.py builds them with random weights; no download)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True),
}
PLAN_PROMPT_TOKENS = 256      # prompt length the plan assumes (chat template + a MATH problem)
LM_HEAD_CHUNK = 256           # positions per chunk in lm_head_logprobs
OPTIMIZER_CHUNK = 1 << 22     # elements per chunk in StochasticRoundingAdamW
GIB = 2 ** 30


def model_config(name):
    """A transformers config from a MODEL_SHAPES name or a folder holding config.json."""
    from transformers import AutoConfig
    if name in MODEL_SHAPES:
        shape = dict(MODEL_SHAPES[name])
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: model config {name!r}: not a shape ({', '.join(MODEL_SHAPES)}) "
                         f"and no readable config.json ({type(e).__name__})") from None


def lora_targets(module_name, module, targets, output_layer):
    """Whether LoRA adapts this module: every Linear but the LM head for "all-linear" (peft's rule),
    else the Linears whose name ends in one of the comma-separated targets."""
    if not isinstance(module, torch.nn.Linear):
        return False
    if targets == "all-linear":
        return module is not output_layer
    return any(module_name == t or module_name.endswith("." + t) for t in targets.split(","))


def memory_plan(config, precision, device_type, rows, new_tokens, micro_batch_tokens, gradient_checkpointing,
                lora_rank=0, lora_target_modules="all-linear", reference_model=False, prompt_tokens=PLAN_PROMPT_TOKENS):
    """Estimated bytes of a run's parts and its peak: {"parts": [(name, bytes)], "sampling", "training",
    "peak", "parameters", "trainable"}. rows = prompts x G; micro_batch_tokens the budget in force."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    output_layer = model.get_output_embeddings()
    adapter = sum(lora_rank * (m.in_features + m.out_features) for n, m in model.named_modules()
                  if lora_rank and lora_targets(n, m, lora_target_modules, output_layer))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, i, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    weight_bytes = 2 if precision == "bf16" else 4
    act = 2 if precision == "bf16" or device_type == "cuda" else 4    # CUDA fp32 runs under bf16 autocast
    trainable = adapter if lora_rank else parameters
    grad_bytes = 4 if lora_rank else weight_bytes                      # adapters train in fp32
    state_bytes = 8 if lora_rank or precision == "fp32" else 4         # fp32 AdamW moments, or bf16 ones
    static = [("weights", parameters * weight_bytes + adapter * 4),
              ("reference model (--kl-coef)", parameters * weight_bytes if reference_model else 0),
              ("optimizer state", trainable * state_bytes)]
    # sampling: the KV cache, preallocated for the whole response, and one decode step's softmax and CDF
    sequence = prompt_tokens + new_tokens
    sampling = [("KV cache", rows * sequence * layers * 2 * kv * act),
                ("decode step softmax + CDF", rows * vocab * (act + 4 + 8 + 8))]
    # training: gradients, one micro-batch's saved activations, the LM head, optimizer temporaries
    tokens = max(micro_batch_tokens, sequence)                         # a longer row goes alone
    norms = 2 * (4 * h + 2 * act * h)
    layer = norms + act * (7 * q + 4 * kv + 4 * i)                     # per token, as autograd saves it
    scratch = act * 3 * i                                              # one layer's backward, transient
    if gradient_checkpointing:
        activations = tokens * (layers * act * h + layer + scratch)
    else:
        activations = tokens * (layers * layer + scratch)
    # bf16 on the CPU: the one-pass kernel keeps nothing; elsewhere the op-by-op update of one chunk holds
    # ~14 fp32-sized temporaries (fp32 copies, the int64 rounding bits and their hash's intermediates)
    optimizer_temporaries = (14 * 4 * min(OPTIMIZER_CHUNK, trainable)
                             if precision == "bf16" and not lora_rank and device_type != "cpu" else 0)
    # a [vocab, width] gradient arrives per LM-head chunk and from the embedding, and autograd sums them
    # into a buffer before .grad: with tied embeddings three such tensors live at once (measured), else one
    tied = model.get_input_embeddings().weight is output_layer.weight
    head_gradients = 0 if lora_rank else (3 if tied else 1) * vocab * h * grad_bytes
    training = [("gradients", trainable * grad_bytes),
                ("activations" + (" (checkpointed)" if gradient_checkpointing else ""), activations),
                ("LM head: saved softmax + fp32 chunk", tokens * vocab * act + LM_HEAD_CHUNK * vocab * 4),
                ("LM head / embedding gradient transients", head_gradients),
                ("optimizer temporaries", optimizer_temporaries)]
    base = sum(b for _, b in static)
    peak_sampling, peak_training = base + sum(b for _, b in sampling), base + sum(b for _, b in training)
    return {"parts": static + sampling + training, "sampling": peak_sampling, "training": peak_training,
            "peak": max(peak_sampling, peak_training), "parameters": parameters, "trainable": trainable,
            "tokens": tokens, "sequence": sequence}


def size(n):
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def plan_line(plan, precision):
    """The one line a run prints at start."""
    return (f"memory plan ({precision}): peak {size(plan['peak'])} while "
            f"{'training' if plan['training'] >= plan['sampling'] else 'sampling'} "
            f"(training {size(plan['training'])}, sampling {size(plan['sampling'])}; "
            f"{plan['parameters'] / 1e6:,.0f}M parameters, {plan['trainable'] / 1e6:,.1f}M trained)")


def plan_table(plan):
    width = max(len(name) for name, _ in plan["parts"])
    lines = [f"{name:<{width}}  {size / GIB:8.3f} GiB" for name, size in plan["parts"]]
    lines.append(f"{'peak while sampling':<{width}}  {plan['sampling'] / GIB:8.3f} GiB")
    lines.append(f"{'peak while training':<{width}}  {plan['training'] / GIB:8.3f} GiB")
    return "\n".join(lines)


def refuse_if_it_cannot_fit(plan, device):
    """On CUDA: stop before loading the weights when the planned peak exceeds the free device memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if plan["peak"] > free:
        raise SystemExit(f"error: the memory plan's peak {plan['peak'] / GIB:.1f} GiB exceeds the free "
                         f"{free / GIB:.1f} GiB on {device}. Lower it with --precision bf16, "
                         f"--gradient-checkpointing, --micro-batch-tokens, --prompts-per-step, --group-size, "
                         f"--max-new-tokens or --lora RANK (see python prerl.py --plan-memory ...)")


def add_lora(model, rank, alpha, targets, seed):
    """Inject LoRA adapters (peft, optional) into the model in place: the model stays the same class,
    so every function of prerl.py scores through the adapted layers unchanged. Only the adapters
    require gradients; they are kept in fp32 even over bf16 base weights."""
    try:
        import peft
        from peft.functional import cast_adapter_dtype
    except ImportError:
        raise SystemExit("error: --lora needs the optional peft package: pip install peft") from None
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets if targets == "all-linear"
                             else targets.split(","), lora_dropout=0.0, bias="none")
    try:
        with torch.random.fork_rng(devices=[]):                          # A's random init: from --seed alone
            torch.manual_seed(seed)
            model = peft.inject_adapter_in_model(config, model)
    except ValueError as e:
        raise SystemExit(f"error: --lora-targets {targets!r}: {e}") from None
    cast_adapter_dtype(model, "default", autocast_adapter_dtype=True)    # bf16/fp16 adapters -> fp32
    return model


def prepare_model(model, lora_rank, lora_alpha, lora_targets, seed, dist):
    """The trained model's machinery, once loaded: LoRA adapters when lora_rank > 0 (add_lora), then
    under torchrun FSDP2 shards (shard_model, dist not None). Returns the model to train."""
    if lora_rank:
        model = add_lora(model, lora_rank, lora_alpha, lora_targets, seed)
    if dist is not None:
        shard_model(model, dist)
    return model


def has_lora(model):
    return any("lora_" in name for name, _ in model.named_parameters())


def adapter_state(model):
    """What a LoRA checkpoint holds: the adapter weights only (the base is --model, unchanged)."""
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


def load_adapter_state(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in name for name in missing):
        raise ValueError(f"adapter does not fit: unexpected {unexpected[:3]}, missing "
                         f"{[n for n in missing if 'lora_' in n][:3]}")


def merged_state_dict(model):
    """The plain model's state dict with every adapter folded in, W + (alpha/r) B A in the base weight's
    dtype -- what peft's merge_and_unload() would leave -- built on the CPU, the model itself untouched
    (it keeps training after a checkpoint's export; merging in place and back is not exact in bf16)."""
    from peft.tuners.lora import LoraLayer
    state = {name.replace(".base_layer.", "."): tensor for name, tensor in model.state_dict().items() if "lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            state[name + ".weight"] = (base.detach().float() + delta.detach().float()).to(base.dtype).cpu()
    return state


# -----------------------------------------------------------------------------
# GPU decode: static KV cache and a captured decode step
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
    if STATIC_DECODE == "off" or (STATIC_DECODE == "auto" and device.type != "cuda") or getattr(model, "prerl_loop_decode", False):
        return False
    from transformers import StaticCache
    layers = StaticCache(config=model.config, max_cache_len=1).layers   # lazy: allocates nothing
    return len(layers) > 0 and all(type(layer) is StaticLayer for layer in layers)


def decode_with_loop(model, on=True):
    """Send this model's rollouts to prerl.generate's plain loop (on=True), e.g. after the preflight's check
    of the static decoder failed on this GPU; on=False gives them back to the static decoder."""
    model.prerl_loop_decode = on


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
        for name, shadow in self.shadow.items():
            shadow.copy_(named[name])                   # the values autocast's cast would give, once per rollout

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
# Distribution: torchrun + FSDP2
# Launched by torchrun (WORLD_SIZE > 1), each process is a rank with a share of the model (PyTorch's own
# FSDP2: fully_shard on each decoder layer and on the root) and a share of each step's prompts, whole
# groups only, so advantages stay local. Three rules keep the result equal to one process:
#   1. the token-mean's denominator counts every rank's tokens (global_denominator);
#   2. a prompt's random numbers are keyed by its index in the whole step, not on its rank (prerl);
#   3. every FSDP collective is entered by every rank in the same order: the rollout runs on weights
#      gathered once (no collective per token, so ranks decode at their own pace), and each rank runs
#      as many forward/backward passes as the busiest rank (match_passes), since every pass all-gathers
#      and reduce-scatters each layer.
# The root's own weights (embeddings, final norm, LM head) stay gathered from the rollout to the optimizer
# step: the scorer reads the LM head's weight directly instead of calling the model's forward, which is
# where FSDP would gather it.


@dataclass
class Distributed:
    rank: int
    world_size: int
    backend: str
    device: torch.device
    mesh: object


def init_distributed(device):
    """Join the torchrun job: NCCL on CUDA (one GPU per local rank), gloo on CPU, a 1-D device mesh.
    Returns None outside torchrun (WORLD_SIZE unset or 1). Ranks other than 0 print nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("fsdp",))
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")       # errors still reach stderr
    print(f"world size {world_size}, {backend}")
    return Distributed(rank, world_size, backend, device, mesh)


def decoder_layers(model):
    """The repeated blocks, by the class names transformers lists as never to be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"error: torchrun: cannot find the decoder layers of {type(model).__name__} to shard")
    return layers


def shard_model(model, dist):
    """fully_shard each decoder layer, then the root (embeddings, final norm, LM head: one group, so tied
    embeddings stay one parameter). CUDA: bf16 weights in forward/backward, fp32 gradient reduction and
    fp32 master shards; CPU: fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if dist.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dist.mesh, mp_policy=policy)
    fully_shard(model, mesh=dist.mesh, mp_policy=policy)
    model.set_reshard_after_backward(False, recurse=False)   # the root stays gathered between micro-batches
    with torch.no_grad():                      # the first forward through the root makes it FSDP's root
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dist.device))
    model.reshard()
    return model


def sharded_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def gather_weights(model):
    """Before a rollout (every rank at once): all-gather every layer and keep it, so decoding runs no
    collective at all and a rank whose responses end early does not wait for the others."""
    model.set_reshard_after_forward(False)
    for module in sharded_modules(model):
        module.unshard()


def shard_layers(model):
    """After a rollout: free the gathered layers (training gathers one layer at a time again); the
    root's weights stay gathered for the scorer until release_root."""
    for module in sharded_modules(model):
        if module is not model:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def release_root(model):
    """Before the optimizer step: the optimizer updates the shards, so the gathered copy must go."""
    model.reshard()


def rank_share(items, dist, may_be_empty=False):
    """This rank's contiguous share of a list and the index of its first item in the whole list:
    sizes differ by at most one, earlier ranks take the extra items. One process (dist None): all, 0."""
    if dist is None:
        return items, 0
    base, extra = divmod(len(items), dist.world_size)
    first = dist.rank * base + min(dist.rank, extra)
    if base == 0 and not may_be_empty:
        raise SystemExit(f"error: torchrun: {len(items)} prompts per step leave some of the {dist.world_size} "
                         f"ranks without a prompt; use --prompts-per-step {dist.world_size} or more")
    return items[first:first + base + (dist.rank < extra)], first


@contextlib.contextmanager
def rollout_share(model, items, dist, may_be_empty=False, release=False):
    """Around a rollout (sampling or evaluation): yields this rank's share of the items and the index of
    its first one (rank_share), with every layer gathered once (gather_weights); on leaving, the layers
    are freed again (shard_layers) and, with release, the root too (release_root). One process (dist
    None): yields (items, 0) and does nothing else."""
    if dist is None:
        yield items, 0
        return
    share = rank_share(items, dist, may_be_empty)
    gather_weights(model)
    yield share
    shard_layers(model)
    if release:
        release_root(model)


def sum_over_ranks(value, dist):
    """A number summed over every rank; the value itself in one process (dist None)."""
    return value if dist is None else all_reduce(value)


def before_optimizer_step(model, loss, dist):
    """Under torchrun, before clipping and the update: the optimizer updates the shards, so the gathered
    root weights go (release_root), and the loss is summed over ranks so that every rank skips a
    non-finite step, or none does. One process (dist None): the loss unchanged."""
    if dist is None:
        return loss
    release_root(model)
    return all_reduce(loss)


def all_reduce(value, op="sum"):
    """A number or tensor reduced over ranks (sum or max); a tensor keeps its device and dtype."""
    import torch.distributed as dist
    tensor = value.clone() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    moved = tensor.to(backend_device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return moved.to(tensor.device) if torch.is_tensor(value) else moved.item()


def global_denominator(tokens, dist):
    """The token-mean's denominator for a rank's loss. FSDP averages the ranks' gradients (divides their
    sum by the world size), so each rank divides its token sum by N / world_size, N = every rank's
    tokens: the average is then sum over all tokens / N, the single-process gradient. Dividing by the
    rank's own token count instead (a per-rank mean) weights a token by its rank's batch: wrong."""
    return all_reduce(tokens).clamp(min=1) / dist.world_size


def match_passes(model, passes, start_id, dist):
    """Run zero-loss forward/backward passes until this rank has run as many as the busiest one: each
    pass all-gathers and reduce-scatters every layer, and ranks must meet at each collective. A zero
    loss through every parameter gives every parameter a zero gradient, so the reduce-scatters line up
    and the sum is unchanged. Called before the rank's own passes (the count is agreed up front).
    One process (dist None): nothing to match."""
    if dist is None:
        return
    most = int(all_reduce(float(passes), op="max"))
    for _ in range(most - passes):
        ids = torch.full((1, 1), start_id, dtype=torch.long, device=dist.device)
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        (hidden.sum() * 0 + head.weight.sum() * 0).backward()


def gather_objects(value):
    """Every rank's value, in rank order (small Python objects: rewards, lengths, counts)."""
    import torch.distributed as dist
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def step_totals(rewards, lengths, loss, kept_tokens, dist):
    """A step's metrics over every rank: all rewards [groups, G] and response lengths in prompt order,
    the loss (each rank's share is its token sum over N / world size, so the mean over ranks is the
    step's loss) and the kept tokens. One process (dist None): unchanged."""
    if dist is None:
        return rewards, lengths, loss, kept_tokens
    parts = gather_objects((rewards.cpu(), lengths.cpu(), loss, kept_tokens))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            sum(p[2] for p in parts) / len(parts), sum(p[3] for p in parts))


def sharded_folder(path):
    return os.path.splitext(path)[0] + ".dcp"


def save_sharded(path, model, optimizer, step, rng, dist):
    """torch.distributed.checkpoint: each rank writes its shards of the model and the optimizer, and its
    RNG state, into a new folder next to `path` (checkpoint.dcp), which then replaces the old one."""
    import shutil
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = sharded_folder(path)
    temporary = f"{folder}.tmp"
    if dist.rank == 0 and os.path.exists(temporary):
        shutil.rmtree(temporary)
    torch_dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary)
    torch.save({"step": step, "rng": rng}, os.path.join(temporary, f"rank{dist.rank}.pt"))
    torch_dist.barrier()
    if dist.rank == 0:                            # swap folders: a crash leaves the old one or the new one
        if os.path.exists(folder):
            os.replace(folder, f"{folder}.old")
        os.replace(temporary, folder)
        shutil.rmtree(f"{folder}.old", ignore_errors=True)
    torch_dist.barrier()


def load_sharded(path, model, optimizer, dist):
    """Resume a torchrun job from checkpoint.dcp: this rank's shards, optimizer state and RNG.
    Returns the step to continue from."""
    import random
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    folder = sharded_folder(path)
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --resume under torchrun needs the sharded checkpoint {folder}/ "
                         f"({path} alone is for one process)")
    if optimizer is None:
        raise SystemExit("error: under torchrun, checkpoints are loaded to resume a run (with its optimizer)")
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)   # also creates the optimizer's state
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        mine = os.path.join(folder, f"rank{dist.rank}.pt")
        extra = torch.load(mine if os.path.exists(mine) else os.path.join(folder, "rank0.pt"), weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: sharded checkpoint {folder} is unreadable or does not fit this model: "
                         f"{type(e).__name__}: {e}") from None
    random.setstate(extra["rng"]["python"])
    torch.set_rng_state(extra["rng"]["torch"])
    if extra["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return int(extra["step"])


def states_to_save(path, model, optimizer, step, rng, lora, dist):
    """(model state, optimizer state) for checkpoint.pt: the state_dicts, LoRA's adapter alone in place of
    the model's (lora). Under torchrun every rank first saves its shards and RNG next to `path`
    (save_sharded), then rank 0 gets the whole states (full_state) and the other ranks (None, None)."""
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    if lora:
        model_state = adapter_state(model)
    if dist is None:
        return model_state, optimizer_state
    save_sharded(path, model, optimizer, step, rng, dist)
    model_state, optimizer_state = full_state(model, optimizer)
    return (model_state, optimizer_state) if dist.rank == 0 else (None, None)


def full_state(model, optimizer):
    """Whole weights and optimizer state in the single-process format (parameters numbered in
    model.parameters() order), so one process can load or --resume them. Every rank must call it;
    rank 0 gets the states, the others empty ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if not model_state:
        return {}, {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    optimizer_state = {
        "state": {index[name]: value for name, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in optimizer_state["param_groups"]]}
    return model_state, optimizer_state


def whole_model(model):
    """(whole state dict, a model to save it with) for save_pretrained on rank 0; every rank must call.
    The sharded model's class is FSDP's subclass (FSDPLlamaForCausalLM), which save_pretrained would
    write into config.json as the architecture; an empty model of the original class (meta device, no
    memory) writes the same files a single process does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    original = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers"))
    with torch.device("meta"):
        empty = original(model.config)
    empty.generation_config = model.generation_config
    return state, empty


def agree_on_stop(stop, dist):
    """A Ctrl-C or SIGTERM that reached any rank stops every rank at the same step (they would otherwise
    part at the next collective): the signal number, largest over ranks, is set on every rank.
    One process (dist None): nothing to agree on."""
    if dist is None:
        return
    signum = int(all_reduce(float(stop.signal or 0), op="max"))
    if signum and stop.signal is None:
        stop.signal = signum
