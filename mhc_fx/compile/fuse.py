"""Fusion pass: find the mHC subgraphs in an ATen graph by what they compute, and replace them
by the fused ops of :mod:`mhc_fx.kernels.ops`.

The pass runs on the pre-dispatch ATen graph the ``mhc`` backend makes of each Dynamo graph
(ops normalised — ``x**2`` and ``x.pow(2)`` are one op — but before autograd, so the fused ops'
own backward formulas end up in the joint forward/backward graph AOTAutograd builds next).

Matching is in two steps, structure then numbers:

1. **Structure proposes.** A Sinkhorn chain — ``exp`` followed by alternating divisions by
   column sums and row sums of an ``[..., n, n]`` tensor, any number of pairs — anchors each
   candidate. Its stream ``X [..., n, C]`` is the activation operand of the projection
   (a matmul/linear with a parameter of ``n·C × (n²+2n)`` values) among its ancestors. The
   candidate region is everything computed from ``X`` and the region's parameters alone
   (the RMS statistics, projection, gates, sigmoids, Sinkhorn, and ``H_pre·X``).
2. **Numbers decide.** The region is evaluated on random inputs (at two scales of ``X``, one
   where the RMS ``eps`` matters) and compared, node by node, with the reference
   :func:`mhc_fx.nn.functional.mhc_coefficients` / ``pre_mix`` for each way the parameters
   can map onto ``(φ, α, b)``. Nodes equal to ``h``, ``H_pre``, ``H_post`` or ``H_res`` are
   replaced by the outputs of one ``mhc_pre`` op; the rest dies with dead-code elimination.

The mixing ``X_next = H_res·X + H_postᵀ·y`` of each fused pre is found the same way (the
nearest node computed from ``X``, ``H_post``, ``H_res`` and one ``[..., C]`` tensor ``y``
alone that equals :func:`~mhc_fx.nn.functional.post_res_mix`) and becomes ``post_res``; a
``post_res`` whose output is the stream of the next fused pre merges with it into
``post_res_pre``. Whatever fails a check stays as it was, with the reason in the report.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections import Counter
from typing import Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..nn import functional as Fn
from ..convert.graph_ops import canonical, dataflow_graph, tensor_meta
from ..convert.residuals import module_path

aten = torch.ops.aten
FUSED_OPS = {
    "pre": "mhc_pre",
    "post_res": "post_res",
    "post_res_pre": "post_res_pre",
}
#: ops that read a projection's activation operand as a (reshaped) copy of the stream.
_PROJECTIONS = {aten.matmul.default, aten.mm.default, aten.linear.default, aten.addmm.default, aten.einsum.default}
#: how far (in ops) the mixing ``X_next`` may lie from its inputs.
_MIX_DEPTH = 8
_MAX_STREAMS = 8


@dataclasses.dataclass(frozen=True)
class Fused:
    """One fused op: ``kind`` (``pre``, ``post_res``, ``post_res_pre``) and the module it came
    from (``nn_module_stack`` of the matched nodes)."""

    kind: str
    owner: str


@dataclasses.dataclass(frozen=True)
class Unfused:
    """A candidate left as it was: where it is and why."""

    kind: str
    owner: str
    reason: str


@dataclasses.dataclass
class FusionReport:
    """What the fusion pass did to one graph.

    Attributes:
        fused: each fused op, in graph order; unfused: candidates left alone, with the reason;
        existing: fused ops the graph already called (a model converted with
        ``fused_ops=True``); recompute: the recomputation plan, if one was applied (see
        :mod:`mhc_fx.compile.recompute`).
    """

    fused: list[Fused] = dataclasses.field(default_factory=list)
    unfused: list[Unfused] = dataclasses.field(default_factory=list)
    existing: Counter = dataclasses.field(default_factory=Counter)
    recompute: str | None = None

    @property
    def counts(self) -> Counter:
        """Fused ops per kind (``pre``, ``post_res``, ``post_res_pre``)."""
        return Counter(f.kind for f in self.fused)

    @property
    def num_pre(self) -> int:
        """Blocks whose pre side runs fused (``pre`` + ``post_res_pre``)."""
        c = self.counts
        return c["pre"] + c["post_res_pre"]

    @property
    def num_post_res(self) -> int:
        """Blocks whose mixing runs fused (``post_res`` + ``post_res_pre``)."""
        c = self.counts
        return c["post_res"] + c["post_res_pre"]

    def __str__(self) -> str:
        c = self.counts
        lines = [
            f"mhc fusion: {c['pre']} pre, {c['post_res']} post_res, {c['post_res_pre']} post_res_pre "
            f"(blocks with fused pre {self.num_pre}, fused mixing {self.num_post_res})"
        ]
        if self.existing:
            lines.append("  already fused in the model: " + ", ".join(f"{k} ×{v}" for k, v in sorted(self.existing.items())))
        lines += [f"  not fused: {u.kind} at {u.owner or '?'}: {u.reason}" for u in self.unfused]
        if not (self.fused or self.unfused or self.existing):
            lines.append("  no Sinkhorn chain in this graph, so no mHC layer to fuse (HC and plain residuals have none)")
        if self.recompute:
            lines.append(f"  recompute: {self.recompute}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """Concrete shape of a node's value (symbolic sizes at their hint), None if not a tensor."""
    val = tensor_meta(node)
    if val is None:
        return None
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape)


def _owner(nodes: Iterable[fx.Node]) -> str:
    """The innermost module path of the first node that has one."""
    for node in nodes:
        path = module_path(node)
        if path:
            return path[-1]
    return ""


def _size_input(node: fx.Node) -> int | None:
    """The hint of a symbolic size that is a graph input (``dynamic=True`` graphs), else None."""
    val = node.meta.get("val")
    if node.op == "placeholder" and isinstance(val, torch.SymInt):
        return int(val.node.hint)
    return None


def _is_const(node: fx.Node) -> bool:
    """A node whose value does not depend on any graph input (a factory or a constant)."""
    return node.op == "get_attr" or (node.op == "call_function" and not node.all_input_nodes)


def _random_like(node: fx.Node, slot: int) -> torch.Tensor:
    """Standard normal test values shaped like ``node``'s value; ``slot`` tells apart the inputs
    of one check (equal slots and shapes give equal values: the blocks of a graph share them)."""
    val = tensor_meta(node)
    return _random(_shape(node), val.dtype, val.device, slot).clone()  # the graph may mutate it


@functools.lru_cache(maxsize=16)
def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(slot)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, object]) -> dict[fx.Node, object]:
    """Run ``nodes`` (in graph order) eagerly on the values in ``env``; returns the env."""
    env = dict(env)
    for node in nodes:
        if node in env:
            continue
        if node.op == "get_attr":
            env[node] = getattr(gm, node.target)
            continue
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        env[node] = node.target(*args, **kwargs)
    return env


def _rel_err(a: object, ref: torch.Tensor) -> float:
    if not isinstance(a, torch.Tensor) or tuple(a.shape) != tuple(ref.shape):
        return float("inf")
    a = a.detach().to(torch.float64).cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _nondeterministic(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (a dropout in eval mode, ``train=False``, does not)."""
    if node.target in (aten.dropout.default, aten.native_dropout.default):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is not False
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


# ------------------------------------------------------------------------ Sinkhorn chains
@dataclasses.dataclass(frozen=True)
class SinkhornChain:
    """``exp`` then ``iters`` (column, row) normalisations of an ``[..., n, n]`` tensor."""

    start: fx.Node
    end: fx.Node
    n: int
    iters: int


def _normalisation(m: fx.Node, ndim: int) -> tuple[int, fx.Node] | None:
    """``(dim, m / m.sum(dim, keepdim=True))`` if a user of ``m`` divides it by its sums over
    one of the two matrix axes (dim -2: columns, -1: rows), else None."""
    for s in m.users:
        if s.target is not aten.sum.dim_IntList or s.args[0] is not m:
            continue
        dims = s.args[1]
        keepdim = s.args[2] if len(s.args) > 2 else s.kwargs.get("keepdim", False)
        if len(dims) != 1:
            continue
        dim = dims[0] - ndim if dims[0] >= 0 else dims[0]
        divisors = [s] if keepdim else [u for u in s.users if u.target is aten.unsqueeze.default and u.args[1] in (dim, dim + ndim)]
        for d in m.users:
            if d.target is aten.div.Tensor and d.args[0] is m and d.args[1] in divisors and dim in (-2, -1):
                return dim, d
    return None


def sinkhorn_chains(graph: fx.Graph) -> tuple[list[SinkhornChain], list[Unfused]]:
    """Every Sinkhorn chain in ``graph``, and the exp-normalisation chains that are not one
    (wrong order of axes, ending on a column step)."""
    chains, rejected = [], []
    for node in graph.nodes:
        if node.target is not aten.exp.default:
            continue
        shape = _shape(node)
        if shape is None or len(shape) < 2 or shape[-1] != shape[-2] or not 1 <= shape[-1] <= _MAX_STREAMS:
            continue
        steps, m = [], node
        while (step := _normalisation(m, len(shape))) is not None:
            steps.append(step[0])
            m = step[1]
        if not steps:
            continue
        if steps == [-2, -1] * (len(steps) // 2):
            chains.append(SinkhornChain(node, m, shape[-1], len(steps) // 2))
        else:
            axes = "".join("c" if s == -2 else "r" for s in steps)
            rejected.append(Unfused("pre", _owner([node]), f"Sinkhorn steps {axes!r} are not (column, row) pairs"))
    return chains, rejected


# -------------------------------------------------------------------------------- pre
@dataclasses.dataclass
class PreMatch:
    """A verified mHC pre side: ``mhc_pre(X, φ, α, b, iters, eps)`` computes ``outputs``
    (``{index of the op's output: nodes equal to it}``)."""

    X: fx.Node
    phi: tuple  # how to build φ [nC, K]: (leaf, transposed)
    alpha: tuple  # (leaves, permutation)
    bias: fx.Node | None
    iters: int
    eps: float
    outputs: dict[int, list[fx.Node]]
    owner: str


def _stream_of(operand: fx.Node, n: int) -> fx.Node | None:
    """The stream ``X [..., n, C]`` nearest above the projection's operand ``[..., nC]`` (its
    reshape, or an RMS-normalised copy of it), within ``_MIX_DEPTH`` ops."""
    width = (_shape(operand) or (0,))[-1]
    frontier, seen = [operand], {operand}
    for _ in range(_MIX_DEPTH):
        for node in frontier:
            shape = _shape(node)
            if shape is not None and len(shape) >= 2 and shape[-2] == n and shape[-2] * shape[-1] == width:
                return node
        frontier = [s for node in frontier for s in node.all_input_nodes if s not in seen and not seen.add(s)]
    return None


def _find_stream(g: nx.DiGraph, chain: SinkhornChain) -> tuple[fx.Node, fx.Node] | None:
    """``(X, projection)``: the projection feeding the chain and the stream it projects."""
    K = chain.n * chain.n + 2 * chain.n
    for node in sorted(nx.ancestors(g, chain.start), key=lambda n: -_order(n)):
        if node.target not in _PROJECTIONS or (_shape(node) or (0,))[-1] != K:
            continue
        for operand in node.all_input_nodes:
            X = _stream_of(operand, chain.n)
            if X is not None:
                return X, node
    return None


def _order(node: fx.Node) -> int:
    return node.meta["_order"]


def _region(g: nx.DiGraph, X: fx.Node, chain: SinkhornChain) -> tuple[list[fx.Node], list[fx.Node]] | str:
    """``(nodes, leaves)``: what is computed from ``X`` and parameters alone around the chain —
    the chain's ancestry from ``X``; then every coefficient-sized value (≤ n²+2n per token)
    computed from those and parameters (gates, biases, sigmoids); then every value computed
    from those and ``X`` alone (``H_pre·X``). ``leaves`` are the parameters (graph inputs) it
    reads. A string says why there is no such region."""
    below, above = nx.descendants(g, X), nx.ancestors(g, X)

    def parameter_side(s: fx.Node) -> bool:
        return s is not X and s not in below and s not in above

    region = (below & nx.ancestors(g, chain.end)) | {chain.end}
    n, C = _shape(X)[-2:]
    coefficients = math.prod(_shape(X)[:-2]) * (n * n + 2 * n)
    for u in sorted(below - region, key=_order):
        shape, srcs = _shape(u), u.all_input_nodes
        small = shape is None or math.prod(shape) <= coefficients
        if u.op == "call_function" and small and any(s in region for s in srcs) and all(
            s in region or parameter_side(s) or (s is X and shape is None) for s in srcs
        ):
            region.add(u)
    leaves: set[fx.Node] = set()
    todo = [s for u in region for s in u.all_input_nodes]
    while todo:
        s = todo.pop()
        if s is X or s in region or s in leaves:
            continue
        if s.op == "placeholder":
            leaves.add(s)  # a parameter, or a symbolic size (evaluated at its hint)
        elif s in above and not _is_const(s):
            return f"the coefficients also read {s.name}, which is not a parameter"
        else:
            region.add(s)
            todo += s.all_input_nodes
    mixes: set[fx.Node] = set()
    for u in sorted(below - region, key=_order):
        srcs = u.all_input_nodes
        if u.op == "call_function" and srcs and all(s is X or s in region or s in mixes for s in srcs):
            mixes.add(u)
    region |= mixes
    if any(_nondeterministic(u) for u in region):
        return "the coefficient subgraph contains a random op"
    return sorted(region, key=_order), sorted(leaves, key=_order)


def _parameter_maps(leaves: list[fx.Node], n: int, C: int) -> Iterable[tuple[tuple, tuple, fx.Node | None]] | str:
    """Every way the region's parameters can be ``(φ, α, b)``: ``(phi, alpha, bias)``."""
    K = n * n + 2 * n
    by_size: dict[int, list[fx.Node]] = {}
    for leaf in leaves:
        by_size.setdefault(math.prod(_shape(leaf)), []).append(leaf)
    phis = by_size.pop(n * C * K, [])
    if len(phis) != 1 or len(_shape(phis[0])) != 2:
        return f"expected one projection parameter of n·C×(n²+2n) = {n * C}×{K} values, found {len(phis)}"
    phi = phis[0]
    orientations = [t for t, shape in ((False, (n * C, K)), (True, (K, n * C))) if _shape(phi) == shape]
    biases = by_size.pop(K, [None]) if K not in (1, 3) else [None]
    if len(biases) != 1:
        return f"expected at most one bias of n²+2n = {K} values, found {len(biases)}"
    if 3 in by_size and len(by_size[3]) == 1:
        gates = tuple(by_size.pop(3))
    elif len(by_size.get(1, [])) == 3:
        gates = tuple(by_size.pop(1))
    else:
        return "expected the gates α as one 3-value parameter or three scalars"
    alphas = [(gates, p) for p in itertools.permutations(range(3))]
    lifted = [leaf.name for leaf in by_size.get(1, []) if _shape(leaf) == ()]
    if lifted:
        return (
            f"the coefficients read 0-dim graph inputs {lifted}: Python floats (such as the RMS eps) that "
            "torch.compile(dynamic=True) lifts to inputs; compile without dynamic=True (sizes still become "
            "dynamic after a shape change, and such graphs are fused)"
        )
    if by_size:
        extra = ", ".join(f"{leaf.name} {list(_shape(leaf))}" for group in by_size.values() for leaf in group)
        return f"the coefficients read parameters mhc_fx's op has no place for: {extra}"
    return [((phi, t), alpha, biases[0]) for t in orientations for alpha in alphas]


def _phi_value(phi: tuple, env: dict) -> torch.Tensor:
    leaf, transposed = phi
    value = env[leaf].to(torch.float64)
    return value.t() if transposed else value


def _alpha_value(alpha: tuple, env: dict) -> torch.Tensor:
    leaves, perm = alpha
    flat = torch.cat([env[leaf].to(torch.float64).reshape(-1) for leaf in leaves])
    return flat[list(perm)]


def _eps_candidates(region: list[fx.Node]) -> list[float]:
    found = [a for n in region for a in n.args if isinstance(a, float) and 0 < a < 1e-2]
    return sorted(set(found)) or [0.0]


def match_pre(gm: fx.GraphModule, g: nx.DiGraph, chain: SinkhornChain) -> PreMatch | Unfused:
    """Verify that ``chain`` ends an mHC pre side and say which nodes ``mhc_pre`` replaces."""
    owner = _owner([chain.start])
    found = _find_stream(g, chain)
    if found is None:
        return Unfused("pre", owner, "no projection of an [..., n, C] stream by a parameter feeds the Sinkhorn chain")
    X, _ = found
    n, C = _shape(X)[-2:]
    region = _region(g, X, chain)
    if isinstance(region, str):
        return Unfused("pre", owner, region)
    nodes, leaves = region
    sizes = {leaf: hint for leaf in leaves if (hint := _size_input(leaf)) is not None}
    leaves = [leaf for leaf in leaves if leaf not in sizes]
    maps = _parameter_maps(leaves, n, C)
    if isinstance(maps, str):
        return Unfused("pre", owner, maps)
    dtype = tensor_meta(X).dtype
    params = {leaf: _random_like(leaf, slot) for slot, leaf in enumerate(leaves, start=1)}
    for leaf in leaves:  # h̃ of order one: sigmoids and Sinkhorn far from flat and from saturated
        if params[leaf].numel() <= 3:
            params[leaf] = params[leaf].abs() + 0.5
        elif params[leaf].numel() == n * C * (n * n + 2 * n):
            params[leaf] = params[leaf] / math.sqrt(n * C)
    runs = []
    for scale in (1.0, 1e-3):
        env = {X: _random_like(X, 0) * scale, **params, **sizes}
        runs.append(_evaluate(gm, nodes, env))
    best: PreMatch | None = None
    for (phi, alpha, bias), eps in itertools.product(maps, _eps_candidates(nodes)):
        outputs = _matching_outputs(nodes, runs, X, phi, alpha, bias, chain.iters, eps, dtype)
        if 3 in outputs and 2 in outputs and (0 in outputs or 1 in outputs):
            match = PreMatch(X, phi, alpha, bias, chain.iters, eps, outputs, owner)
            if best is None or len(outputs) > len(best.outputs):
                best = match
            if len(outputs) == 4:  # nothing can match more
                break
    if best is None:
        return Unfused("pre", owner, "the subgraph around the Sinkhorn chain does not compute mHC's coefficients")
    return best


def _matching_outputs(nodes, runs, X, phi, alpha, bias, iters, eps, dtype) -> dict[int, list[fx.Node]]:
    """``{output index: nodes}`` of the region equal to ``mhc_pre``'s outputs in every run
    (empty as soon as ``H_res`` or ``H_post`` has no equal: the map is wrong)."""
    out_dtypes = {0: dtype, 1: Fn.compute_dtype(dtype), 2: Fn.compute_dtype(dtype), 3: Fn.compute_dtype(dtype)}
    candidates = {i: [n for n in nodes if (tensor_meta(n) is not None and tensor_meta(n).dtype == dt)] for i, dt in out_dtypes.items()}
    for env in runs:
        X64 = env[X].to(torch.float64).cpu()
        phi64, alpha64 = _phi_value(phi, env).cpu(), _alpha_value(alpha, env).cpu()
        b64 = env[bias].to(torch.float64).reshape(-1).cpu() if bias is not None else torch.zeros(phi64.shape[1], dtype=torch.float64)
        H_pre, H_post, H_res = Fn.mhc_coefficients(X64, phi64, alpha64, b64, sinkhorn_iters=iters, eps=eps)
        for i, ref in ((3, H_res), (2, H_post)):
            candidates[i] = [n for n in candidates[i] if _rel_err(env[n], ref) <= 1e-4]
            if not candidates[i]:
                return {}
        candidates[1] = [n for n in candidates[1] if _rel_err(env[n], H_pre) <= 1e-4]
        h = Fn.pre_mix(X64, H_pre)
        candidates[0] = [n for n in candidates[0] if _rel_err(env[n], h) <= _tolerance(dtype)]
    return {i: sorted(ns, key=_order) for i, ns in candidates.items() if ns}


def _build_params(graph: fx.Graph, match: PreMatch) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Nodes for ``(φ [nC, K], α [3], b [K])`` (inserted at the graph's insertion point)."""
    leaf, transposed = match.phi
    phi = graph.call_function(aten.t.default, (leaf,)) if transposed else leaf
    leaves, perm = match.alpha
    if len(leaves) == 1 and perm == (0, 1, 2):
        alpha = graph.call_function(aten.reshape.default, (leaves[0], [3]))
    else:
        parts = [graph.call_function(aten.reshape.default, (lf, [-1])) for lf in leaves]
        flat = parts[0] if len(parts) == 1 else graph.call_function(aten.cat.default, (parts,))
        alpha = graph.call_function(aten.stack.default, ([graph.call_function(aten.select.int, (flat, 0, i)) for i in perm],))
    K = _shape(leaf)[0] if transposed else _shape(leaf)[1]
    if match.bias is not None:
        bias = graph.call_function(aten.reshape.default, (match.bias, [K]))
    else:
        bias = graph.call_function(aten.new_zeros.default, (leaf, [K]))
    return phi, alpha, bias


def _insert_op(graph: fx.Graph, before: fx.Node, target, args: tuple, outputs: int) -> list[fx.Node]:
    with graph.inserting_before(before):
        op = graph.call_function(target, args)
        return [graph.call_function(operator.getitem, (op, i)) for i in range(outputs)]


def _replace(nodes_by_output: dict[int, list[fx.Node]], outs: list[fx.Node]) -> None:
    for i, nodes in nodes_by_output.items():
        for node in nodes:
            node.replace_all_uses_with(outs[i])


# ------------------------------------------------------------------------------- post_res
@dataclasses.dataclass
class PostMatch:
    X_next: fx.Node
    y: fx.Node


def _closure(target: fx.Node, sources: set[fx.Node]) -> list[fx.Node] | None:
    """Nodes computing ``target`` from ``sources`` (and constants) alone, within
    ``_MIX_DEPTH`` ops; None if ``target`` needs anything else."""
    seen, frontier = {target}, [target]
    for _ in range(_MIX_DEPTH):
        nxt = []
        for node in frontier:
            for src in node.all_input_nodes:
                if src in sources or src in seen:
                    continue
                if (src.op == "placeholder" and _size_input(src) is None) or _nondeterministic(src):
                    return None
                seen.add(src)
                nxt.append(src)
        frontier = nxt
        if not frontier:
            return sorted(seen, key=_order)
    return None


def match_post(gm: fx.GraphModule, g: nx.DiGraph, X: fx.Node, H_post: fx.Node, H_res: fx.Node) -> PostMatch | None:
    """The node computing ``post_res_mix(X, y, H_post, H_res)`` for some ``y [..., C]``."""
    shape, dtype = _shape(X), tensor_meta(X).dtype
    y_shape = shape[:-2] + shape[-1:]
    near = nx.single_source_shortest_path_length(g, H_res, cutoff=_MIX_DEPTH)
    after_post = nx.descendants(g, H_post)
    candidates = sorted((n for n in near if n in after_post and _shape(n) == shape), key=_order)
    for target in candidates:
        if tensor_meta(target).dtype != dtype:
            continue
        back = nx.single_source_shortest_path_length(g.reverse(copy=False), target, cutoff=_MIX_DEPTH)
        for y in sorted(back, key=lambda n: back[n]):
            if y in (X, H_post, H_res) or _shape(y) != y_shape or y in near:
                continue
            sources = {X, y, H_post, H_res}
            nodes = _closure(target, sources)
            if nodes is None:
                continue
            env = {s: _random_like(s, slot) for slot, s in enumerate((X, y, H_post, H_res))}
            env[H_res] = env[H_res].abs()
            env.update({n: hint for n in nodes if (hint := _size_input(n)) is not None})
            value = _evaluate(gm, nodes, env)[target]
            ref = Fn.post_res_mix(*(env[s].to(torch.float64).cpu() for s in (X, y, H_post, H_res)))
            if _rel_err(value, ref) <= _tolerance(dtype):
                return PostMatch(target, y)
    return None


# ---------------------------------------------------------------------------------- pass
def _number(graph: fx.Graph) -> None:
    for i, node in enumerate(graph.nodes):
        node.meta["_order"] = i


def _existing(graph: fx.Graph) -> Counter:
    names = {getattr(torch.ops.mhc_fx, op).default: kind for kind, op in FUSED_OPS.items()}
    return Counter(names[n.target] for n in graph.nodes if n.target in names)


def fuse_mhc(gm: fx.GraphModule, refresh_meta, cross_layer: bool = True) -> FusionReport:
    """Fuse every verified mHC pre side, its mixing, and (``cross_layer``) adjacent
    post_res + pre pairs in ``gm`` (a pre-dispatch ATen graph with ``meta["val"]`` on its
    nodes), in place. ``refresh_meta(gm)`` recomputes ``meta["val"]`` after a rewrite."""
    graph = gm.graph
    report = FusionReport(existing=_existing(graph))
    _number(graph)
    g = dataflow_graph(graph)
    chains, rejected = sinkhorn_chains(graph)
    report.unfused += rejected
    pres = []  # (op node, X, H_post, H_res, owner)
    for chain in chains:
        match = match_pre(gm, g, chain)
        if isinstance(match, Unfused):
            report.unfused.append(match)
            continue
        first = min((n for ns in match.outputs.values() for n in ns), key=_order)
        with graph.inserting_before(first):
            params = _build_params(graph, match)
        outs = _insert_op(graph, first, torch.ops.mhc_fx.mhc_pre.default, (match.X, *params, match.iters, match.eps), 4)
        _replace(match.outputs, outs)
        pres.append((outs[0].args[0], match))
        missing = [name for i, name in enumerate(("h", "H_pre")) if i not in match.outputs]
        if missing:
            report.unfused.append(Unfused("pre", match.owner, f"{'/'.join(missing)} computed outside the fused op (no node equals it)"))
    graph.eliminate_dead_code()
    refresh_meta(gm)
    _number(graph)
    g = dataflow_graph(graph)
    posts = {}  # pre op node → post_res op node
    for op, match in pres:
        H_post, H_res = (u for u in sorted(op.users, key=lambda u: u.args[1]) if u.args[1] in (2, 3))
        X = op.args[0]  # the stream as it is now (an earlier block's mixing may have been replaced)
        post = match_post(gm, g, X, H_post, H_res)
        if post is None:
            report.unfused.append(Unfused("post_res", match.owner, "no node computes H_res·X + H_postᵀ·y from this block's coefficients"))
            continue
        with graph.inserting_before(post.X_next):
            new = graph.call_function(torch.ops.mhc_fx.post_res.default, (X, post.y, H_post, H_res))
        post.X_next.replace_all_uses_with(new)
        new.meta.update(val=post.X_next.meta["val"], _order=_order(post.X_next) - 0.5)
        g.add_edges_from([(src, new) for src in new.all_input_nodes] + [(new, user) for user in new.users])
        posts[op] = new
    graph.eliminate_dead_code()
    refresh_meta(gm)
    merged = _merge_cross_layer(graph, pres, posts) if cross_layer else {}
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    refresh_meta(gm)
    for op, match in pres:
        post = posts.get(op)
        if op in merged:
            report.fused.append(Fused("post_res_pre", match.owner))
        else:
            report.fused.append(Fused("pre", match.owner))
        if post is not None and post not in merged.values():
            report.fused.append(Fused("post_res", match.owner))
    return report


def _hoist(node: fx.Node, before: fx.Node) -> None:
    """Move ``node`` and the inputs it needs in front of ``before`` (they read parameters only)."""
    if _order(node) < _order(before):
        return
    for src in node.all_input_nodes:
        _hoist(src, before)
    before.prepend(node)
    node.meta["_order"] = _order(before) - 0.5


def _merge_cross_layer(graph: fx.Graph, pres: list, posts: dict) -> dict:
    """Replace ``pre(post_res(...))`` pairs by ``post_res_pre``; returns {pre op: post op} merged."""
    _number(graph)
    merged = {}
    for op, match in pres:
        producer = canonical(op.args[0])
        if producer.target is not torch.ops.mhc_fx.post_res.default:
            continue
        X, y, H_post, H_res = producer.args
        _, phi, alpha, bias, iters, eps = op.args
        for arg in (phi, alpha, bias):
            _hoist(arg, producer)
        outs = _insert_op(graph, producer, torch.ops.mhc_fx.post_res_pre.default, (X, y, H_post, H_res, phi, alpha, bias, iters, eps), 5)
        for user in list(op.users):
            user.replace_all_uses_with(outs[1 + user.args[1]])
        producer.replace_all_uses_with(outs[0])
        merged[op] = producer
    return merged
