"""Match an mHC pre side around a Sinkhorn chain: which nodes ``mhc_pre`` replaces, and with
which ``(X, φ, α, b, iters, eps)``.

1. **Structure proposes.** The chain's stream ``X [..., n, C]`` is the activation operand of the
   projection (a matmul/linear with a parameter of ``n·C × (n²+2n)`` values) found walking up
   from the chain. The candidate region is everything computed from ``X`` and parameters alone
   around it (RMS statistics, projection, gates, sigmoids, Sinkhorn, ``H_pre·X``), searched in
   a window of the graph around the chain.
2. **Numbers decide** (:mod:`mhc_fx.compile.check`), on a few tokens: the region's values at two
   scales of ``X`` (one where the RMS ``eps`` matters), and once more with its small float
   literals moved to :func:`~mhc_fx.compile.check.probes` (so an epsilon's placement shows),
   against :func:`mhc_fx.nn.functional.mhc_coefficients` / ``pre_mix`` in the chain's
   :class:`~mhc_fx.nn.functional.Form` for each way the parameters can map onto ``(φ, α, b)``
   and each literal the RMS ``eps`` and ``H_pre``'s epsilon can be; then its vector-Jacobian
   products against the reference's, after a structural look for stop-gradients, so the fused
   op is the region's function in forward **and** backward.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable

import torch
import torch.fx as fx

from ..nn import functional as Fn
from ..graph.ops import tensor_meta
from . import check
from .nodes import inputs, is_const, nondeterministic, order, owner, shape, size_input, users, walk
from .fusion_report import Unfused
from .sinkhorn_chain import SinkhornChain

aten = torch.ops.aten
#: ops that read a projection's activation operand as a (reshaped) copy of the stream.
PROJECTIONS = {aten.matmul.default, aten.mm.default, aten.linear.default, aten.addmm.default, aten.einsum.default}
#: ops between the projection and the start of its Sinkhorn chain, at most.
SEARCH_DEPTH = 48
#: graph positions after the chain in which gates, sigmoids and ``H_pre·X`` are looked for.
WINDOW = 512
#: how far (in ops) a stream's reshaped or normalised copy may be from the stream.
STREAM_DEPTH = 8
#: how far up a value may be computed from parameters alone to count as parameter-side.
PARAMETER_DEPTH = 16


@dataclasses.dataclass
class PreMatch:
    """A verified mHC pre side: ``mhc_pre(X, φ, α, b, iters, eps, form=form.spec)`` computes
    ``outputs`` (``{index of the op's output: nodes equal to it}``)."""

    X: fx.Node
    phi: tuple  # how to build φ [nC, K]: (leaf, transposed)
    alpha: tuple  # (leaves, permutation)
    bias: fx.Node | None
    iters: int
    eps: float
    outputs: dict[int, list[fx.Node]]
    owner: str
    form: Fn.Form = Fn.PAPER


def _stream_of(operand: fx.Node, n: int) -> fx.Node | None:
    """The stream ``X [..., n, C]`` nearest above the projection's operand ``[..., nC]`` (its
    reshape, or an RMS-normalised copy of it)."""
    width = (shape(operand) or (0,))[-1]
    for node in walk(operand, inputs, lambda _: True, STREAM_DEPTH):
        s = shape(node)
        if s is not None and len(s) >= 2 and s[-2] == n and s[-2] * s[-1] == width:
            return node
    return None


def _find_stream(chain: SinkhornChain) -> fx.Node | None:
    """The stream the projection feeding ``chain`` projects (nearest projection first)."""
    K = chain.n * chain.n + 2 * chain.n
    above = walk(chain.start, inputs, lambda _: True, SEARCH_DEPTH)
    for node in sorted(above, key=lambda u: (above[u], -order(u))):
        if node.target not in PROJECTIONS or (shape(node) or (0,))[-1] != K:
            continue
        for operand in node.all_input_nodes:
            X = _stream_of(operand, chain.n)
            if X is not None:
                return X
    return None


def _region(X: fx.Node, chain: SinkhornChain) -> tuple[list[fx.Node], list[fx.Node]] | str:
    """``(nodes, leaves, interior)``: what is computed from ``X`` and parameters alone around the chain —
    the chain's ancestry from ``X``; then every coefficient-sized value (≤ n²+2n per token)
    computed from those and parameters (gates, biases, sigmoids); then every value computed
    from those and ``X`` alone (``H_pre·X``). ``leaves`` are the parameters (graph inputs) it
    reads; ``interior`` is everything between ``X`` and ``H_res``, which no output of the op
    replaces. A string says why there is no such region."""
    lo, hi = order(X), order(chain.end)
    below = set(walk(X, users, lambda u: order(u) <= hi + WINDOW)) - {X}
    between = walk(chain.end, inputs, lambda u: order(u) > lo)
    region = {u for u in between if u in below} | {chain.end}
    interior = region - {chain.end}  # the chain's own iterates (close to H_res once converged)
    sides: dict[fx.Node, bool] = {}

    def parameter_side(s: fx.Node) -> bool:
        """Computed from graph inputs and constants alone, within PARAMETER_DEPTH ops, not from X."""
        if s not in sides:
            up = walk(s, inputs, lambda _: True, PARAMETER_DEPTH)
            sides[s] = s is not X and s not in below and X not in up and all(
                u.op == "placeholder" or is_const(u) or up[u] < PARAMETER_DEPTH for u in up
            )
        return sides[s]

    n, C = shape(X)[-2:]
    coefficients = math.prod(shape(X)[:-2]) * (n * n + 2 * n)
    for u in sorted(below - region, key=order):
        s, srcs = shape(u), u.all_input_nodes
        small = s is None or math.prod(s) <= coefficients
        if u.op == "call_function" and small and any(v in region for v in srcs) and all(
            v in region or parameter_side(v) or (v is X and s is None) for v in srcs
        ):
            region.add(u)
    leaves: set[fx.Node] = set()
    todo = [v for u in region for v in u.all_input_nodes]
    while todo:
        v = todo.pop()
        if v is X or v in region or v in leaves:
            continue
        if v.op == "placeholder":
            leaves.add(v)  # a parameter, or a symbolic size (evaluated at its hint)
        elif not is_const(v) and not parameter_side(v):
            return f"the coefficients also read {v.name}, which is not computed from parameters alone"
        else:
            region.add(v)
            todo += v.all_input_nodes
    mixes: set[fx.Node] = set()
    for u in sorted(below - region, key=order):
        srcs = u.all_input_nodes
        if u.op == "call_function" and srcs and all(v is X or v in region or v in mixes for v in srcs):
            mixes.add(u)
    region |= mixes
    if any(nondeterministic(u) for u in region):
        return "the coefficient subgraph contains a random op"
    return sorted(region, key=order), sorted(leaves, key=order), interior


def _parameter_maps(leaves: list[fx.Node], n: int, C: int) -> Iterable[tuple[tuple, tuple, fx.Node | None]] | str:
    """Every way the region's parameters can be ``(φ, α, b)``: ``(phi, alpha, bias)``."""
    K = n * n + 2 * n
    by_size: dict[int, list[fx.Node]] = {}
    for leaf in leaves:
        by_size.setdefault(math.prod(shape(leaf)), []).append(leaf)
    phis = by_size.pop(n * C * K, [])
    if len(phis) != 1 or len(shape(phis[0])) != 2:
        return f"expected one projection parameter of n·C×(n²+2n) = {n * C}×{K} values, found {len(phis)}"
    phi = phis[0]
    orientations = [t for t, s in ((False, (n * C, K)), (True, (K, n * C))) if shape(phi) == s]
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
    lifted = [leaf.name for leaf in by_size.get(1, []) if shape(leaf) == ()]
    if lifted:
        return (
            f"the coefficients read 0-dim graph inputs {lifted}: Python floats (such as the RMS eps) that "
            "torch.compile(dynamic=True) lifts to inputs; compile without dynamic=True (sizes still become "
            "dynamic after a shape change, and such graphs are fused)"
        )
    if by_size:
        extra = ", ".join(f"{leaf.name} {list(shape(leaf))}" for group in by_size.values() for leaf in group)
        return f"the coefficients read parameters mhc_fx's op has no place for: {extra}"
    return [((phi, t), alpha, biases[0]) for t in orientations for alpha in alphas]


def _op_parameters(phi: tuple, alpha: tuple, bias: fx.Node | None, values: dict[fx.Node, torch.Tensor]):
    """``(φ [nC, K], α [3], b [K])`` built from the leaves' ``values`` as the map says."""
    leaf, transposed = phi
    p = values[leaf].t() if transposed else values[leaf]
    gates, perm = alpha
    a = torch.cat([values[g].reshape(-1) for g in gates])[list(perm)]
    b = values[bias].reshape(-1) if bias is not None else p.new_zeros(p.shape[1])
    return p, a, b


def _literals(region: list[fx.Node]) -> list[float]:
    """The region's small float literals: what its epsilons can be."""
    return sorted({a for n in region for a in n.args if isinstance(a, float) and 0 < a < 1e-2})


def _check_values(leaves: list[fx.Node], n: int, C: int, draws: check.Draws) -> dict[fx.Node, torch.Tensor]:
    """Parameter values with ``h̃`` of order one: sigmoids and Sinkhorn neither flat nor saturated."""
    values = {}
    for slot, leaf in enumerate(leaves, start=1):
        v = draws.like(leaf, slot)
        if v.numel() <= 3:
            v = v.abs() + 0.5
        elif v.numel() == n * C * (n * n + 2 * n):
            v = v / math.sqrt(n * C)
        values[leaf] = v
    return values


def match_pre(gm: fx.GraphModule, chain: SinkhornChain, modes: dict[fx.Node, bool], draws: check.Draws) -> PreMatch | Unfused:
    """Verify that ``chain`` ends an mHC pre side and say which nodes ``mhc_pre`` replaces
    (``modes``: each node's grad mode; ``draws``: the pass's random check values)."""
    who = owner([chain.start])
    X = _find_stream(chain)
    if X is None:
        return Unfused("pre", who, "no projection of an [..., n, C] stream by a parameter feeds the Sinkhorn chain")
    n, C = shape(X)[-2:]
    region = _region(X, chain)
    if isinstance(region, str):
        return Unfused("pre", who, region)
    nodes, leaves, interior = region
    sizes = [leaf for leaf in leaves if size_input(leaf) is not None]
    leaves = [leaf for leaf in leaves if leaf not in sizes]
    maps = _parameter_maps(leaves, n, C)
    if isinstance(maps, str):
        return Unfused("pre", who, maps)
    params = _check_values(leaves, n, C, draws)
    tokens = check.TokenSlice.of(shape(X)).fixing(nodes, leaves)
    literals = _literals(nodes)
    runs = _forward_runs(gm, nodes, X, params, sizes, tokens, draws, literals)
    if runs is None and math.prod(tokens.lead) <= 64:  # a graph whose shapes do not cut: small anyway
        tokens = dataclasses.replace(tokens, few=tokens.lead)
        runs = _forward_runs(gm, nodes, X, params, sizes, tokens, draws, literals)
    if runs is None:
        return Unfused("pre", who, f"its shapes do not follow the token dims {list(tokens.lead)}, so it cannot be checked on a few tokens")
    best = None
    dtype = tensor_meta(X).dtype
    exact = [{k: v.to(torch.float64).cpu() for k, v in env.items() if k is X or k in params} for env, _ in runs]
    for (phi, alpha, bias), eps, pre_eps in itertools.product(maps, literals or [0.0], [0.0, *literals]):
        form = dataclasses.replace(chain.form, pre_eps=pre_eps)
        candidates = [u for u in nodes if u not in interior]
        outputs = _matching_outputs(candidates, runs, exact, X, (phi, alpha, bias), chain.iters, eps, form, dtype)
        if 3 in outputs and 2 in outputs and (0 in outputs or 1 in outputs):
            if best is None or len(outputs) > len(best.outputs):
                best = PreMatch(X, phi, alpha, bias, chain.iters, eps, outputs, who, form)
            if len(outputs) == 4:  # nothing can match more
                break
    if best is None:
        return Unfused("pre", who, "the subgraph around the Sinkhorn chain does not compute mHC's coefficients")
    replaced = [node for ns in best.outputs.values() for node in ns]
    reason = check.stop_gradient(nodes, replaced, modes)
    if reason is None and any(modes[u] for u in nodes):
        reason = _backward_mismatch(gm, nodes, best, params, runs[0][0][X], sizes, tokens, modes, n)
    return best if reason is None else Unfused("pre", who, reason)


def _forward_runs(gm, nodes, X, params, sizes, tokens, draws, literals) -> list[tuple[dict, dict]] | None:
    """The region on a few tokens, at two scales of X, then with its ``literals`` at their
    :func:`~mhc_fx.compile.check.probes`: ``(values, literal map)`` per run; None if its shapes
    do not cut."""
    runs = []
    settings = [(1.0, {}), (1e-3, {})] + ([(1.0, check.probes(literals))] if literals else [])
    for scale, swap in settings:
        env = {X: draws.like(X, 0, tokens) * scale, **params, **{s: tokens.size(size_input(s)) for s in sizes}}
        try:
            with torch.no_grad():
                env = check.evaluate(gm, nodes, env, tokens, literals=swap)
        except RuntimeError:
            return None
        if not check.cut_shapes_agree(nodes, env, tokens):
            return None
        runs.append((env, swap))
    return runs


def _matching_outputs(nodes, runs, exact, X, parameter_map, iters, eps, form, dtype) -> dict[int, list[fx.Node]]:
    """``{output index: nodes}`` of the region equal to ``mhc_pre``'s outputs (in ``form``) in
    every run (empty as soon as ``H_res`` or ``H_post`` has no equal: the map is wrong)."""
    coef = Fn.compute_dtype(dtype)
    out_dtypes = {0: dtype, 1: coef, 2: coef, 3: coef}
    candidates = {i: [u for u in nodes if (tensor_meta(u) is not None and tensor_meta(u).dtype == dt)] for i, dt in out_dtypes.items()}
    for (env, swap), values in zip(runs, exact):
        phi, alpha, bias = _op_parameters(*parameter_map, values)
        probed = dataclasses.replace(form, pre_eps=swap.get(form.pre_eps, form.pre_eps), res_eps=swap.get(form.res_eps, form.res_eps))
        H_pre, H_post, H_res = Fn.mhc_coefficients(
            values[X], phi, alpha, bias, sinkhorn_iters=iters, eps=swap.get(eps, eps), form=probed
        )
        for i, ref in ((3, H_res), (2, H_post)):
            candidates[i] = [u for u in candidates[i] if check.rel_err(env[u], ref) <= check.tolerance(coef)]
            if not candidates[i]:
                return {}
        candidates[1] = [u for u in candidates[1] if check.rel_err(env[u], H_pre) <= check.tolerance(coef)]
        h = Fn.pre_mix(values[X], H_pre)
        candidates[0] = [u for u in candidates[0] if check.rel_err(env[u], h) <= check.tolerance(dtype)]
    return {i: sorted(ns, key=order) for i, ns in candidates.items() if ns}


def _backward_mismatch(gm, nodes, match: PreMatch, params, X_value, sizes, tokens, modes, n) -> str | None:
    """Why the region's VJPs differ from ``mhc_pre``'s, or None."""
    keys = [match.X, *params]

    def reference(values: list[torch.Tensor]) -> list[torch.Tensor]:
        by_node = dict(zip(keys, values))
        phi, alpha, bias = _op_parameters(match.phi, match.alpha, match.bias, by_node)
        X = by_node[match.X]
        H_pre, H_post, H_res = Fn.mhc_coefficients(
            X, phi, alpha, bias, sinkhorn_iters=match.iters, eps=match.eps, form=match.form
        )
        return [Fn.pre_mix(X, H_pre), H_pre, H_post, H_res]

    outputs = [(node, i) for i, ns in match.outputs.items() for node in ns]
    names = {match.X: "the stream X", **{leaf: f"parameter {leaf.name}" for leaf in params}}
    constants = {s: tokens.size(size_input(s)) for s in sizes}
    return check.vjp_mismatch(gm, nodes, {match.X: X_value, **params}, outputs, reference, tokens, modes, names, constants)


def build_params(graph: fx.Graph, match: PreMatch) -> tuple[fx.Node, fx.Node, fx.Node]:
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
    K = shape(leaf)[0] if transposed else shape(leaf)[1]
    if match.bias is not None:
        bias = graph.call_function(aten.reshape.default, (match.bias, [K]))
    else:
        bias = graph.call_function(aten.new_zeros.default, (leaf, [K]))
    return phi, alpha, bias
