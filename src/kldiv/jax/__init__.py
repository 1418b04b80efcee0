"""JAX-specific pieces of kldiv: the divergence family over vocabulary slices held by the
devices of a mesh axis, for use inside ``jax.shard_map``.

The core functions (``kldiv.kl_div`` and the rest) need no wrapper on JAX arrays: they are
``jit``, ``grad`` and ``vmap`` safe as they are. Importing this module imports JAX;
``import kldiv`` alone does not.
"""

from __future__ import annotations

from .parallel import pad_vocab, vocab_parallel_divergence

__all__ = ["vocab_parallel_divergence", "pad_vocab"]
