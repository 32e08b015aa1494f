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
"""

import ctypes
import sys

import torch
from transformers.cache_utils import DynamicLayer

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


# -----------------------------------------------------------------------------
# Distribution: torchrun + FSDP2 (issue 12)
