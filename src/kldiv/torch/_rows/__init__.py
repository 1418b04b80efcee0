"""The row engine on PyTorch: one dispatcher (:mod:`.dispatch`) in front of the engines that
compute a divergence between two rows of logits and its gradient (tensor code on any device,
the compiled C kernel on CPU, the Triton kernels on GPU). The kinds, their parameters and
their endpoints come from :mod:`kldiv._kinds`."""
