"""SSD-SGD written straight from SPEC's formulas, one tensor at a time, sharing no code with
``ssd_allreduce.algorithm`` (nor the simulator): a mistake in the shared math cannot cancel out
in a comparison against this.

Per worker ``r``: ``w_r`` its parameters then float buffers (each sorted by name). Warm-up
(t < T): gradients averaged, then the local optimizer steps. At t = T, before the step: W = w_0
and every w_r = W. Steps t >= T, j = t - T: local step; land the window launched d steps ago
(W = W + D; w_r = W + beta (w_r - s_r) + (1 - beta) (d / k) D for parameters, W for buffers);
at (j + 1) % k == 0: s_r = w_r, D = mean_r (s_r - W), and with d = 0 land at once.

Outer optimizer (SPEC's "Outer optimizer"): for parameters, m = mu m + D and the global step
G = lr_o (D + mu m) (Nesterov) or lr_o m takes D's place in both formulas; buffers land at W + D.
``beta`` may be a function of the steps the window was in flight. ``lr_scale``: the local steps
after the warm-up run at that multiple of the optimizer's learning rate.

Drift correction (``drift``): after every local step after the warm-up, w_r = w_r + c_r (zero
before the first landing); at a landing, before W moves, c_r = (a_r + D - (s_r - W)) / k for
parameters, with a_r the sum of the corrections rank r added over that window's k steps (counted
step by step here).

Averaged moments (``moments``, Adam's family): each rank's ``exp_avg`` and ``exp_avg_sq`` m_r
travel as the weights do: at t = T every m_r = rank 0's; at a launch sm_r = m_r, Dm = mean_r
(sm_r - M); at its landing, e steps after the launch, M = M + Dm and m_r = M + (m_r - sm_r), a
second moment at least beta2^e M.

Hierarchical (SPEC's "Hierarchical windows", ``ranks_per_node`` R): workers r = nR .. nR + R - 1
form node n. For t >= T their gradients are averaged over the node before the local step, so its
workers share their parameters; D = mean over nodes of the node's mean (s_r - W), which is the
mean over workers. With one node there is no window: every step is synchronous SGD.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


def local_tensors(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    params = [p for _, p in sorted(model.named_parameters())]
    buffers = [b for _, b in sorted(model.named_buffers()) if b.is_floating_point()]
    return params, buffers


class ReferenceSSD:
    def __init__(self, make_model: Callable[[], nn.Module], make_optimizer: Callable, workers: int, *,
                 k: int, d: int, T: int, beta, ranks_per_node: Optional[int] = None, outer_lr: float = 1.0,
                 outer_mu: float = 0.0, nesterov: bool = True, lr_scale: float = 1.0, drift: bool = False,
                 moments: bool = False, overwrite: bool = False) -> None:
        self.R = ranks_per_node
        self.overwrite = overwrite   # a landing sets every rank to W (the ablation's baseline), not GLU
        self.moments = moments
        self.M: list[Tensor] = []
        self.sm: list[list[Tensor]] = []
        self.Dm: list[Tensor] = []
        self.drift = drift
        self.c: Optional[list[list[Tensor]]] = None
        self.added: Optional[list[list[Tensor]]] = None          # since the last launch
        self.added_window: Optional[list[list[Tensor]]] = None   # over the window in flight
        self.outer_lr, self.outer_mu, self.nesterov, self.lr_scale = outer_lr, outer_mu, nesterov, lr_scale
        self.m: Optional[list[Tensor]] = None
        self.models = [make_model() for _ in range(workers)]
        self.opts = [make_optimizer(m.parameters()) for m in self.models]
        self.k, self.d, self.T, self.beta = k, d, T, beta
        self.t = 0
        self.W: Optional[list[Tensor]] = None
        self.launched_at: Optional[int] = None
        self.s: list[list[Tensor]] = []
        self.D: list[Tensor] = []

    def _w(self, r: int) -> list[Tensor]:
        params, buffers = local_tensors(self.models[r])
        return params + buffers

    def _m(self, r: int) -> list[tuple[str, Tensor]]:
        """Rank ``r``'s Adam moments: (key, tensor), parameter by parameter in the shared order."""
        state = self.opts[r].state
        return [(key, state[p][key]) for p in local_tensors(self.models[r])[0]
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if key in state[p]]

    @torch.no_grad()
    def _land(self, elapsed: int) -> None:
        n_params = len(local_tensors(self.models[0])[0])
        beta = self.beta(elapsed) if callable(self.beta) else self.beta
        if self.m is None:
            self.m = [torch.zeros_like(D) for D in self.D]
        if self.drift:
            self.c = [[(self.added_window[r][i] + self.D[i] - (self.s[r][i] - self.W[i])) / self.k
                       for i in range(n_params)] for r in range(len(self.models))]
        G = []
        for i, D in enumerate(self.D):
            if i < n_params:
                self.m[i] = self.outer_mu * self.m[i] + D
                G.append(self.outer_lr * (D + self.outer_mu * self.m[i]) if self.nesterov else self.outer_lr * self.m[i])
            else:
                G.append(D)
        self.W = [W + g for W, g in zip(self.W, G)]
        for r in range(len(self.models)):
            for i, (w, W, s, g) in enumerate(zip(self._w(r), self.W, self.s[r], G)):
                if i < n_params and not self.overwrite:
                    w.copy_(W + beta * (w - s) + (1 - beta) * (elapsed / self.k) * g)
                else:
                    w.copy_(W)
        if self.moments:
            self.M = [M + Dm for M, Dm in zip(self.M, self.Dm)]
            for r in range(len(self.models)):
                for (key, m), M, sm in zip(self._m(r), self.M, self.sm[r]):
                    m.copy_(M + (m - sm))
                    if key.endswith("_sq"):
                        beta2 = self.opts[r].param_groups[0]["betas"][1]
                        m.copy_(torch.maximum(m, M * beta2 ** elapsed))
        self.launched_at = None

    def step(self, batches: list[Batch], loss_fn: Callable) -> None:
        for model, opt, (x, y) in zip(self.models, self.opts, batches):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
        t, workers = self.t, len(self.models)
        nodes = 1 if self.R is None else workers // self.R
        if t < self.T:
            self._average(list(range(workers)))
        elif self.R is not None:
            for n in range(nodes):
                self._average(list(range(n * self.R, (n + 1) * self.R)))
        windows = t >= self.T and nodes > 1 if self.R is not None else t >= self.T   # one node: none ever
        if windows and self.W is None:
            with torch.no_grad():
                self.W = [w.clone() for w in self._w(0)]
                for r in range(workers):
                    for w, W in zip(self._w(r), self.W):
                        w.copy_(W)
                if self.moments:
                    self.M = [m.clone() for _, m in self._m(0)]
                    for r in range(workers):
                        for (_, m), M in zip(self._m(r), self.M):
                            m.copy_(M)
        for opt in self.opts:
            lrs = [group["lr"] for group in opt.param_groups]
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * (self.lr_scale if windows else 1.0)
            opt.step()
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        if windows and self.drift:
            n_params = len(local_tensors(self.models[0])[0])
            if self.c is None:
                self.c = [[torch.zeros_like(w) for w in self._w(r)[:n_params]] for r in range(workers)]
                self.added = [[torch.zeros_like(c) for c in self.c[r]] for r in range(workers)]
            with torch.no_grad():
                for r in range(workers):
                    for w, c, a in zip(self._w(r), self.c[r], self.added[r]):
                        w.add_(c)
                        a.add_(c)
        if windows:
            j = t - self.T
            if self.d > 0 and self.launched_at == t - self.d:
                self._land(self.d)
            if (j + 1) % self.k == 0:
                with torch.no_grad():
                    self.s = [[w.clone() for w in self._w(r)] for r in range(workers)]
                    self.D = [sum(self.s[r][i] - self.W[i] for r in range(workers)) / workers
                              for i in range(len(self.W))]
                    if self.moments:
                        self.sm = [[m.clone() for _, m in self._m(r)] for r in range(workers)]
                        self.Dm = [sum(self.sm[r][i] - self.M[i] for r in range(workers)) / workers
                                   for i in range(len(self.M))]
                if self.drift:
                    self.added_window = self.added
                    self.added = [[torch.zeros_like(a) for a in added] for added in self.added]
                self.launched_at = t
                if self.d == 0:
                    self._land(0)
        self.t += 1

    def _average(self, group: list[int]) -> None:
        grads = [[p.grad for p in local_tensors(self.models[r])[0]] for r in group]
        for i in range(len(grads[0])):
            mean = sum(g[i] for g in grads) / len(group)
            for g in grads:
                g[i].copy_(mean)

    def finish(self) -> None:
        if self.launched_at is not None:
            self._land(self.t - 1 - self.launched_at)

    def tensors(self, r: int) -> list[Tensor]:
        return [w.detach().clone() for w in self._w(r)]
