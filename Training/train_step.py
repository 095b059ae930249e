"""One optimisation step of the training loop, shared by Training/train.py and the benchmark's
training-throughput rows, so that both time and run the same step."""

from __future__ import annotations

from collections.abc import Callable


class TrainStep:
    """Forward pass (bf16 autocast where asked), loss, backward pass and optimiser step on one
    batch. The same object serves one CPU, one GPU and several GPUs (DistributedDataParallel
    wraps ``net``)."""

    def __init__(self, net, optimizer, loss_fn: Callable, amp_dtype=None) -> None:
        self.net = net
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.amp_dtype = amp_dtype

    def __call__(self, x, target):
        import torch

        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits = self.net(x)
        loss = self.loss_fn(logits.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
