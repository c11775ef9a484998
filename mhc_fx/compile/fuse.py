"""The fusion pass: find the mHC subgraphs of an ATen graph by what they compute and replace
them by the fused ops of :mod:`mhc_fx.kernels.custom_ops`.

It runs on the pre-dispatch ATen graph the ``mhc`` backend makes of each Dynamo graph (ops
normalised — ``x**2`` and ``x.pow(2)`` are one op — but before autograd, so the fused ops' own
backward formulas end up in the joint forward/backward graph AOTAutograd builds next):

1. :mod:`~mhc_fx.compile.sinkhorn_chain` anchors each candidate on a Sinkhorn chain;
2. :mod:`~mhc_fx.compile.match_pre` proves the pre side around it (forward and backward, on a
   few tokens) and ``mhc_pre`` replaces it;
3. :mod:`~mhc_fx.compile.match_post` proves each fused pre's mixing, which ``post_res`` replaces;
4. :mod:`~mhc_fx.compile.cross_layer` merges a ``post_res`` feeding the next ``mhc_pre``.

Whatever fails a check stays as it was, with the reason in the :class:`FusionReport`.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from ..graph.ops import tensor_meta
from ..kernels import runtime
from . import check
from .check import grad_modes
from .cross_layer import insert_op, merge_cross_layer
from .match_post import match_post
from .match_pre import build_params, match_pre
from .nodes import number, order
from .fusion_report import Fused, FusionReport, Unfused
from .sinkhorn_chain import sinkhorn_chains

FUSED_OPS = {"pre": "mhc_pre", "post_res": "post_res", "post_res_pre": "post_res_pre"}


def _existing(graph: fx.Graph) -> Counter:
    names = {getattr(torch.ops.mhc_fx, op).default: kind for kind, op in FUSED_OPS.items()}
    return Counter(names[n.target] for n in graph.nodes if n.target in names)


def _settle(new: list[fx.Node], position: float) -> None:
    """Give nodes just inserted (and the new nodes they read) a graph position — later
    candidates' bounded walks compare positions — and their fake value ``meta["val"]``,
    computed from their inputs' (nothing else in the graph changed, so nothing else is
    re-propagated)."""
    for node in new:
        if "_order" in node.meta:
            continue
        node.meta["_order"] = position
        _settle(node.all_input_nodes, position)
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with detect_fake_mode(pytree.tree_leaves((args, kwargs))) or contextlib.nullcontext():
            node.meta["val"] = node.target(*args, **kwargs)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The checks' tensors hold a few tokens: intra-op threads cost more than they save (and
    spin when the cores are busy, as during a compile)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fuse_mhc(
    gm: fx.GraphModule, cross_layer: bool = True, grad_enabled: bool | None = None, cpu_path: str = "compiled_reference",
) -> FusionReport:
    """Fuse every verified mHC pre side, its mixing, and (``cross_layer``) adjacent
    post_res + pre pairs in ``gm`` (a pre-dispatch ATen graph with fake ``meta["val"]`` on its
    nodes), in place. ``grad_enabled`` is the grad mode the graph runs in (default: the
    current one). Each fused op is pinned to a path (:func:`mhc_fx.kernels.runtime.pinned_path`):
    the Triton kernels where they run, else ``cpu_path``."""
    with _one_thread():
        return _fuse(gm, cross_layer, torch.is_grad_enabled() if grad_enabled is None else grad_enabled, cpu_path)


def _fuse(gm: fx.GraphModule, cross_layer: bool, enabled: bool, cpu_path: str) -> FusionReport:
    start = time.perf_counter()
    graph = gm.graph
    draws = check.Draws()
    report = FusionReport(existing=_existing(graph))
    number(graph)
    modes = grad_modes(graph, enabled)
    chains, rejected = sinkhorn_chains(graph)
    report.unfused += rejected
    pres = []  # (mhc_pre op node, match)
    for chain in chains:
        match = match_pre(gm, chain, modes, draws)
        if isinstance(match, Unfused):
            report.unfused.append(match)
            continue
        first = min((n for ns in match.outputs.values() for n in ns), key=order)
        with graph.inserting_before(first):
            params = build_params(graph, match)
        path = runtime.pinned_path(tensor_meta(match.X).device, cpu_path)
        args = (match.X, *params, match.iters, match.eps, path, match.form.spec)
        outs = insert_op(graph, first, torch.ops.mhc_fx.mhc_pre.default, args, 4)
        _settle(outs, order(first) - 0.5)
        for i, nodes in match.outputs.items():
            for node in nodes:
                node.replace_all_uses_with(outs[i])
        pres.append((outs[0].args[0], match))
        missing = [name for i, name in enumerate(("h", "H_pre")) if i not in match.outputs]
        if missing:
            report.unfused.append(Unfused("pre", match.owner, f"{'/'.join(missing)} computed outside the fused op (no node equals it)"))
    graph.eliminate_dead_code()
    number(graph)
    modes = grad_modes(graph, enabled)
    posts = {}  # pre op node → post_res op node
    for op, match in pres:
        H_post, H_res = (u for u in sorted(op.users, key=lambda u: u.args[1]) if u.args[1] in (2, 3))
        X = op.args[0]  # the stream as it is now (an earlier block's mixing may have been replaced)
        post = match_post(gm, X, H_post, H_res, modes, draws)
        if isinstance(post, str):
            report.unfused.append(Unfused("post_res", match.owner, post))
            continue
        with graph.inserting_before(post.X_next):
            if post.transposed:  # the graph mixes with H_resᵀ (DeepSeek-V4 consumes its comb so)
                H_res = graph.call_function(torch.ops.aten.transpose.int, (H_res, -2, -1))
                _settle([H_res], order(post.X_next) - 0.75)
            new = graph.call_function(torch.ops.mhc_fx.post_res.default, (X, post.y, H_post, H_res, op.args[6]))
        post.X_next.replace_all_uses_with(new)
        new.meta.update(val=post.X_next.meta["val"], _order=order(post.X_next) - 0.5)
        modes[new] = modes[post.X_next]
        posts[op] = new
    graph.eliminate_dead_code()
    merged = merge_cross_layer(graph, [op for op, _ in pres]) if cross_layer else {}
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    for op, match in pres:
        post = posts.get(op)
        report.fused.append(Fused("post_res_pre" if op in merged else "pre", match.owner, match.form.name))
        if post is not None and post not in merged.values():
            report.fused.append(Fused("post_res", match.owner, match.form.name))
    report.seconds = time.perf_counter() - start
    return report
