"""Calibration: hooks on every MoE block that sum, per expert, what the analysis and GPTQ need.

For each MoE layer and each projection p (0: gate_up / up, 1: down) with K_p input channels:
  count  [E]        tokens routed to each expert (the router's usage histogram)
  weight [E]        summed routing weight
  x2     [E, K_p]   sum of squared inputs of the tokens routed to each expert
  wx2    [E, K_p]   the same, each token weighted by its routing weight
  all_x2 [E, K_p]   with balanced=True: every token through every expert (for experts short of tokens)
  hessian[E, K_p, K_p]  on demand (GPTQ), float64 sums of per-batch float32 X^T X of the routed tokens
  gx2    [E, K_p]   from `sensitivity` (a pass with gradients): the same as x2, each token weighted by
                    ||dL/d(output of projection p)||^2 / N_p, the loss gradient at that expert's output
  grad_tokens []    tokens of the pass with gradients
With keep_inputs=True the hook also keeps the experts' inputs of the current pass, so that GPTQ can
form the expert-balanced Hessian (every token through the expert) of just the experts short of
routed tokens, instead of every expert's.
For the nn.Linear layers of shared experts and dense MLPs the same sums are kept as a one-expert
LayerStats (count [1], x2 [1, K], hessian [1, K, K] on demand), keyed by the Linear's name.
Everything is a sum in float64, so shards from several processes add up to the one-process result.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import align_module_device
from tqdm.auto import tqdm

from . import adapters


@dataclass
class LayerStats:
    count: torch.Tensor
    weight: torch.Tensor
    x2: list[torch.Tensor]
    wx2: list[torch.Tensor]
    all_x2: list[torch.Tensor] | None = None
    all_count: torch.Tensor | None = None
    hessian: list[torch.Tensor] | None = None
    gx2: list[torch.Tensor] | None = None
    grad_tokens: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": self.count, "weight": self.weight}
        for name in ("x2", "wx2", "all_x2", "hessian", "gx2"):
            for p, t in enumerate(getattr(self, name) or []):
                out[f"{name}.{p}"] = t
        for name in ("all_count", "grad_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "LayerStats":
        def lst(name):
            ps = sorted(int(k.split(".")[1]) for k in t if k.startswith(name + "."))
            return [t[f"{name}.{p}"] for p in ps] or None
        return cls(t["count"], t["weight"], lst("x2"), lst("wx2"), lst("all_x2"), t.get("all_count"),
                   lst("hessian"), lst("gx2"), t.get("grad_tokens"))


def _routing_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs[n] for n in names[len(args):3] if n in kwargs]
    if len(vals) < 3:
        raise TypeError("the experts module was not called as experts(hidden_states, top_k_index, top_k_weights)")
    return vals


def _project(experts, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """Projection `name` of fused expert e on x [T, K] -> [T, N] in float32 (bias included)."""
    w = getattr(experts, name)[e].float()
    y = x @ w if experts.is_transposed else x @ w.t()
    return y + getattr(experts, name + "_bias")[e].float() if experts.has_bias else y


def _activate(experts, u: torch.Tensor) -> torch.Tensor:
    """The first projection's output u [T, N_0] -> the down projection's input [T, I]."""
    return experts._apply_gate(u) if experts.has_gate else experts.act_fn(u)


def _finish(experts, z: torch.Tensor) -> torch.Tensor:
    """The down projection's output z [T, H] -> the expert's output (after a post-expert norm if any)."""
    if getattr(experts, "has_post_expert_norm", False):
        return experts.post_expert_norm(z.to(experts.down_proj.dtype)).float()
    return z


def _first_name(experts) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_inputs(experts, e: int, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of each projection of fused expert e for tokens x [T, H]: [x, act(gate_up(x))]."""
    return [x, _activate(experts, _project(experts, _first_name(experts), e, x))]


def expert_output(experts, e: int, h: torch.Tensor) -> torch.Tensor:
    """Output of fused expert e from its down projection's input h [T, I] -> [T, H] (float32, before the
    routing weight), as transformers' experts forward computes it."""
    return _finish(experts, _project(experts, "down_proj", e, h))


def output_gradients(experts, e: int, x: torch.Tensor, g: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For tokens x [T, H] routed to expert e, with g [T, H] the loss gradient at the expert's output
    (the routing weight already applied): each projection's inputs [x, h] and the loss gradient at
    each projection's output [dL/du [T, N_0], dL/dz [T, H]]."""
    with torch.enable_grad():
        u = _project(experts, _first_name(experts), e, x.detach()).requires_grad_(True)
        h = _activate(experts, u)
        z = _project(experts, "down_proj", e, h)
        gu, gz = torch.autograd.grad(_finish(experts, z), [u, z], g)
    return [x, h.detach()], [gu, gz]


def _gram(t: torch.Tensor) -> torch.Tensor:
    """t [T, K] -> t^T t [K, K] in float64: one batch's product in float32 (half the time of float64;
    the batch sums stay in float64)."""
    t = t.float()
    return (t.t() @ t).double()


CHECK_TOKENS = 16   # tokens on which the first replaced forward of each experts module is checked


class _BlockHook:
    """Sums one MoE block's statistics. Installed in place of the experts' forward (`run`): each expert's
    projections are computed once, for the sums and for the output, instead of the forward computing
    them and the sums again. The first call checks the output against the module's own forward on a few
    tokens; a module it does not reproduce (or one wrapped by accelerate's hooks) keeps its forward and
    gets the sums from a pre-forward hook (`__call__`), which computes the projections a second time."""

    def __init__(self, block: adapters.MoEBlock, balanced: bool, hessian: bool, keep_inputs: bool = False,
                 outputs: bool = True):
        self.block, self.balanced, self.hessian, self.keep_inputs = block, balanced, hessian, keep_inputs
        self.outputs = outputs                # False: nothing reads the forward's output, zeros are returned
        self.stats: LayerStats | None = None
        self.inputs: list[torch.Tensor] = []      # with keep_inputs: the experts' inputs [T, H] of each call
        self.thread = threading.get_ident()   # forwards served meanwhile by other threads do not count
        self.replaced: bool | None = None     # None until the first call of the replaced forward is checked

    def _init(self, dims: list[int], device):
        e = self.block.num_experts
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.stats = LayerStats(z(e), z(e), [z(e, k) for k in dims], [z(e, k) for k in dims],
                                [z(e, k) for k in dims] if self.balanced else None,
                                z(()) if self.balanced else None,
                                [z(e, k, k) for k in dims] if self.hessian else None)

    def _sums(self, module, args, kwargs, out: torch.Tensor | None = None):
        """Add one call's statistics; with out [T, H] float32, also add each expert's weighted output."""
        x, idx, w = _routing_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()
        idx, w = idx.reshape(x.shape[0], -1), w.reshape(x.shape[0], -1).float()
        if self.keep_inputs:
            self.inputs.append(x.detach().clone())
        with align_module_device(module, x.device):
            hit = torch.unique(idx).tolist()
            for e in range(self.block.num_experts):
                tok, kpos = (idx == e).nonzero(as_tuple=True)
                if e not in hit and not self.balanced:
                    continue
                if self.balanced:
                    inputs = expert_inputs(module, e, x)           # every token through expert e
                    routed = [t[tok] for t in inputs]
                else:
                    routed = expert_inputs(module, e, x[tok])
                    inputs = None
                if self.stats is None:
                    self._init([t.shape[-1] for t in routed], x.device)
                s, we = self.stats, w[tok, kpos].double()
                s.count[e] += tok.numel()
                s.weight[e] += we.sum()
                for p, t in enumerate(routed):
                    t2 = t.double().pow(2)
                    s.x2[p][e] += t2.sum(0)
                    s.wx2[p][e] += we @ t2
                    if self.hessian:
                        s.hessian[p][e] += _gram(t)
                if self.balanced:
                    for p, t in enumerate(inputs):
                        s.all_x2[p][e] += t.double().pow(2).sum(0)
                if out is not None and tok.numel():
                    out.index_add_(0, tok, expert_output(module, e, routed[-1]) * w[tok, kpos, None])
            if self.balanced:
                self.stats.all_count += x.shape[0]

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        if threading.get_ident() == self.thread:
            self._sums(module, args, kwargs)

    @torch.no_grad()
    def run(self, module, forward, *args, **kwargs):
        """The experts' forward while collecting; `forward` is the module's own."""
        hidden = _routing_args(args, kwargs)[0]
        if threading.get_ident() != self.thread or self.replaced is False or hidden.dim() != 2:
            self(module, args, kwargs)
            return forward(*args, **kwargs)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        self._sums(module, args, kwargs, out if self.outputs else None)
        out = out.to(hidden.dtype)
        if self.replaced is None and self.outputs:
            n = min(CHECK_TOKENS, hidden.shape[0])
            cut = [a[:n] if isinstance(a, torch.Tensor) else a for a in args]
            ref = forward(*cut, **{k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            tol = 1e-4 if hidden.dtype == torch.float32 else 3e-2
            ref, finite = ref.float(), bool(ref.isfinite().all())
            self.replaced = finite and bool(torch.allclose(out[:n].float(), ref, rtol=tol,
                                                           atol=tol * float(ref.abs().max()) + 1e-6))
            if not self.replaced:
                if finite:
                    warnings.warn(f"calibration could not reproduce {type(module).__name__}'s forward; it keeps "
                                  "its own forward and the statistics cost a second pass over the experts", stacklevel=2)
                return forward(*args, **kwargs)
        return out

    @torch.no_grad()
    def balanced_hessian(self, p: int, e: int) -> torch.Tensor:
        """[K_p, K_p] float64: X^T X of every kept token through expert e's projection p."""
        if not self.inputs:
            raise RuntimeError("balanced_hessian needs a pass collected with keep_inputs=True")
        module, h = self.block.experts, None
        for x in self.inputs:
            with align_module_device(module, x.device):
                g = _gram(expert_inputs(module, e, x)[p])
            h = g if h is None else h + g
        return h


class _LinearHook:
    """Sums over the inputs of one nn.Linear (shared experts, dense MLPs)."""

    def __init__(self, hessian: bool):
        self.hessian, self.stats = hessian, None
        self.thread = threading.get_ident()

    @torch.no_grad()
    def __call__(self, module, args):
        if threading.get_ident() != self.thread:
            return
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        if self.stats is None:
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
            k = x.shape[-1]
            self.stats = LayerStats(z(1), z(1), [z(1, k)], [z(1, k)], hessian=[z(1, k, k)] if self.hessian else None)
        s = self.stats
        s.count += x.shape[0]
        s.weight += x.shape[0]
        s.x2[0][0] += x.pow(2).sum(0)
        s.wx2[0][0] += x.pow(2).sum(0)
        if self.hessian:
            s.hessian[0][0] += x.t() @ x


def dense_linears(model, layer: int | None = None) -> dict:
    """The nn.Linear layers of shared experts and dense MLPs (of one decoder layer if given)."""
    out = {}
    for fqn, m in model.named_modules():
        if adapters.is_shared_expert(m, fqn) or adapters.is_dense_mlp(m, fqn) or (
                adapters.experts_of(m) is None and any(n in adapters.SHARED_NAMES for n in fqn.split("."))):
            for name, lin in m.named_modules(prefix=fqn):
                if isinstance(lin, torch.nn.Linear) and (layer is None or adapters.layer_index(name) == layer):
                    out[name] = lin
    return out


@contextlib.contextmanager
def collecting_linears(linears: dict, hessian: bool = False):
    """Within the block, every forward adds to the input sums of the given nn.Linear layers."""
    hooks = {name: _LinearHook(hessian) for name in linears}
    handles = [lin.register_forward_pre_hook(hooks[name]) for name, lin in linears.items()]
    try:
        yield hooks
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def collecting(model, blocks=None, balanced=False, hessian=False, keep_inputs=False, outputs=True):
    """Within the block, every forward adds to the statistics of each MoE block: yields
    {layer: hook} whose `.stats` hold the sums. outputs=False: the caller discards what the forward
    returns, so the experts skip their down projections and return zeros."""
    blocks = blocks if blocks is not None else adapters.moe_blocks(model)
    hooks, handles, replaced = {}, [], []
    for b in blocks:
        if b.adapter.calibration is not None:
            raise NotImplementedError(f"calibration of {type(b.experts).__name__} is not supported yet: "
                                      f"{b.adapter.calibration}; quantize it data-free (bits=/expert_bits=)")
        hook = hooks[b.layer] = _BlockHook(b, balanced, hessian, keep_inputs, outputs)
        if "forward" in vars(b.experts):      # already wrapped (accelerate's offload hooks): leave it be
            handles.append(b.experts.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            b.experts.forward = functools.partial(hook.run, b.experts, b.experts.forward)
            replaced.append(b.experts)
    try:
        yield hooks
    finally:
        for h in handles:
            h.remove()
        for m in replaced:
            del m.forward


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(tensors) -> None:
    """Sum each tensor over processes, in place (no-op in a single process)."""
    if rank_world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_(stats: dict[int, LayerStats]) -> None:
    """Sum statistics over processes (no-op in a single process)."""
    _sum_over_processes(t for s in stats.values() for t in s.tensors().values())


def _shard(windows: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """This process's windows, and whether it has none: with fewer windows than processes, a process
    without any runs the first window and adds zeros, so that every process joins the reductions with
    sums of the right shapes."""
    rank, world = rank_world()
    shard = windows[rank::world]
    return (windows[:1], True) if shard.shape[0] == 0 else (shard, False)


def input_device(model) -> torch.device:
    """Where inputs go: accelerate's execution device for an offloaded model, else the weights' device."""
    hook = getattr(model, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@torch.no_grad()
def calibrate(model, windows: torch.Tensor, batch_size: int = 8, balanced: bool = False,
              desc: str = "calibrating", progress: bool = True) -> dict[int | str, LayerStats]:
    """Run windows [N, T] through the model (this process's shard of them) and return the summed
    statistics of every MoE layer (int keys) and of every shared-expert and dense-MLP nn.Linear
    (their names), reduced over all processes."""
    rank = rank_world()[0]
    shard, empty = _shard(windows)
    device = input_device(model)
    with collecting(model, balanced=balanced) as hooks, collecting_linears(dense_linears(model)) as lin:
        for i in tqdm(range(0, shard.shape[0], batch_size), desc=desc, disable=not progress or rank != 0,
                      unit="batch"):
            out = model(input_ids=shard[i:i + batch_size].to(device), use_cache=False)
            if not torch.isfinite(out.logits).all():
                raise FloatingPointError(f"the model produced NaN/inf on calibration batch {i // batch_size} "
                                         f"({desc}); check the weights and dtype")
    missing = [layer for layer, h in hooks.items() if h.stats is None]
    if missing:
        raise RuntimeError(f"MoE layers {missing} received no tokens: the model never called their experts")
    stats = {layer: h.stats for layer, h in hooks.items()}
    stats.update({name: h.stats for name, h in lin.items() if h.stats is not None})
    if empty:
        for s in stats.values():
            for t in s.tensors().values():
                t.zero_()
    all_reduce_(stats)
    return stats


@contextlib.contextmanager
def _frozen(model):
    """Within the block no parameter asks for a gradient (a pass with gradients for the activations only)."""
    asked = [p for p in model.parameters() if p.requires_grad]
    for p in asked:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in asked:
            p.requires_grad_(True)


def sensitivity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "loss sensitivity",
                progress: bool = True) -> tuple[dict[int, list[torch.Tensor]], int]:
    """One pass with gradients over windows [N, T] (this process's shard): for every MoE layer and
    projection p, gx2 [E, K_p] = sum over tokens t routed to expert e of ||dL/dy_p||^2 / N_p * x_c^2,
    where y_p [N_p] is that projection's output for the token, x its input and L the summed next-token
    loss. sum_c gx2[e, c] * ||dW[:, c]||^2 then estimates what an error dW of the projection's weight
    adds to the loss (errors of separate outputs and channels taken as independent). Returns the sums,
    reduced over processes, and the number of predicted tokens. Parameters get no gradients."""
    rank = rank_world()[0]
    shard, empty = _shard(windows)
    device = input_device(model)
    blocks = adapters.moe_blocks(model)
    for b in blocks:
        if b.adapter.calibration is not None:
            raise NotImplementedError(f"the loss sensitivity of {type(b.experts).__name__} is not supported yet: "
                                      f"{b.adapter.calibration}")
    seen: dict[int, list] = {}                 # layer -> [x [T, H], idx [T, k], w [T, k], dL/d(output) [T, H]]
    sums: dict[int, list[torch.Tensor]] = {}

    def pre(layer, module, args, kwargs):
        x, idx, w = _routing_args(args, kwargs)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        seen[layer] = [x, idx.reshape(x.shape[0], -1), w.detach().reshape(x.shape[0], -1).float()]

    def post(layer, module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if out.requires_grad:
            out.register_hook(lambda g: seen[layer].append(g.detach().reshape(-1, g.shape[-1]).float()))

    def leaf(module, args, out):              # the embeddings' output starts the graph
        return out.detach().requires_grad_(True)

    handles = [model.get_input_embeddings().register_forward_hook(leaf)]
    for b in blocks:
        handles.append(b.experts.register_forward_pre_hook(functools.partial(pre, b.layer), with_kwargs=True))
        handles.append(b.experts.register_forward_hook(functools.partial(post, b.layer)))
    tokens = 0
    try:
        with _frozen(model), torch.enable_grad():
            for i in tqdm(range(0, shard.shape[0], batch_size), desc=desc, disable=not progress or rank != 0,
                          unit="batch"):
                ids = shard[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is not finite on batch {i // batch_size} ({desc}); "
                                             "check the weights and dtype")
                loss.backward()
                tokens += ids[:, 1:].numel()
                for b in blocks:
                    if len(seen.get(b.layer, ())) == 4:
                        _add_sensitivity(b, sums.setdefault(b.layer, []), *seen.pop(b.layer))
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    missing = [b.layer for b in blocks if b.layer not in sums]
    if missing:
        raise RuntimeError(f"MoE layers {missing} got no loss gradient: the model never called their experts")
    if empty:
        tokens = 0
        for t in (t for s in sums.values() for t in s):
            t.zero_()
    n = torch.tensor(float(tokens), device=device)
    _sum_over_processes([n] + [t for s in sums.values() for t in s])
    return {layer: [t.cpu() for t in s] for layer, s in sums.items()}, int(n)


@torch.no_grad()
def _add_sensitivity(block: adapters.MoEBlock, acc: list[torch.Tensor], x, idx, w, g) -> None:
    """Add one batch to gx2 (acc: one [E, K_p] float64 sum per projection, made on first use)."""
    experts = block.experts
    with align_module_device(experts, x.device):
        for e in torch.unique(idx).tolist():
            tok, kpos = (idx == e).nonzero(as_tuple=True)
            inputs, grads = output_gradients(experts, e, x[tok], g[tok] * w[tok, kpos, None])
            if not acc:
                acc.extend(torch.zeros(block.num_experts, t.shape[-1], dtype=torch.float64, device=x.device)
                           for t in inputs)
            for p, (t, gr) in enumerate(zip(inputs, grads)):
                acc[p][e] += gr.double().pow(2).mean(-1) @ t.double().pow(2)
