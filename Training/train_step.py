"""One optimisation step of the training loop: run eagerly, or captured once as a CUDA graph
and replayed."""

from __future__ import annotations

from collections.abc import Callable


class TrainStep:
    """Forward pass (bf16 autocast where asked), loss, backward pass and optimiser step on one
    batch, run eagerly. The form for the CPU and for several GPUs (DistributedDataParallel).

    Autocast keeps no weight cache (``cache_enabled=False``) so that the same code can be
    captured in a CUDA graph by :class:`CudaGraphTrainStep`."""

    def __init__(self, net, optimizer, loss_fn: Callable, amp_dtype=None) -> None:
        self.net = net
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.amp_dtype = amp_dtype

    def run(self, x, target):
        import torch

        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            logits = self.net(x)
        loss = self.loss_fn(logits.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x, target):
        return self.run(x, target)


class CudaGraphTrainStep(TrainStep):
    """The same step on one GPU, captured once as a CUDA graph and then replayed.

    Why: at the study's batch of 2 a step of this small network is a few milliseconds of GPU
    work behind some 30-40 ms of Python and kernel launches (41 ms per step measured for one
    process in the first H200 call), so the GPU sat mostly idle. A replay launches the whole
    step at once. What it needs: fixed batch shapes (the loop drops the last partial batch),
    an optimiser built with ``capturable=True`` and a tensor learning rate, which the
    scheduler updates in place, so the replayed step reads the current rate. As in PyTorch's
    whole-network capture recipe, the first ``warmup`` steps run eagerly on a side stream
    (cuDNN autotuning and the optimiser state happen there); every batch still trains once:
    the capture step replays its own batch right after capturing it."""

    def __init__(self, net, optimizer, loss_fn: Callable, amp_dtype=None, warmup: int = 3) -> None:
        import torch

        super().__init__(net, optimizer, loss_fn, amp_dtype)
        self.warmup = warmup
        self.steps = 0
        self.graph = None
        self.side_stream = torch.cuda.Stream()

    def __call__(self, x, target):
        import torch

        if self.graph is None and self.steps < self.warmup:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                loss = self.run(x, target)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            self.steps += 1
            return loss
        if self.graph is None:
            self.static_x, self.static_target = x.clone(), target.clone()
            # Gradients must not exist before capture: the captured backward pass then
            # allocates them in the graph's pool and every replay overwrites them.
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self.run(self.static_x, self.static_target)
        else:
            self.static_x.copy_(x)
            self.static_target.copy_(target)
        self.graph.replay()
        self.steps += 1
        return self.static_loss.clone()


def make_optimizer(parameters, lr: float, weight_decay: float, device, graphed: bool):
    """AdamW; for a captured step its state and learning rate live on the GPU as tensors."""
    import torch

    if graphed:
        return torch.optim.AdamW(parameters, lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                                 capturable=True)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def make_train_step(net, optimizer, loss_fn: Callable, amp_dtype, graphed: bool) -> TrainStep:
    return (CudaGraphTrainStep if graphed else TrainStep)(net, optimizer, loss_fn, amp_dtype)
