"""The Triton engine: jit kernels (:mod:`.kernels`) → launcher (:mod:`.launch`) → custom ops
with autograd (:mod:`.ops`)."""
