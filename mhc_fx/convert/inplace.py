"""Pass: make in-place ops on intermediate values out-of-place.

``out += shortcut`` (timm) is captured as ``aten.add_.Tensor(out, shortcut)`` and ReLUs as
``aten.relu_``; a rewrite that replaces such a node must not leave later readers of the mutated
tensor behind. Each in-place op whose mutated input is an intermediate that nothing else aliases (not a
parameter, buffer or graph input — BatchNorm statistics stay in place — and neither a view nor
the base of a view) becomes its out-of-place form, and every later reader of the mutated value
reads the new node instead. Mutations through views stay as they are; the residual search
leaves values they touch alone.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph.ops import inplace_to_functional, is_view


def functionalize_intermediate_inplace(gm: fx.GraphModule) -> int:
    """Rewrite ``gm.graph`` in place (not recompiled); returns how many ops changed."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        target = inplace_to_functional(node)
        mutated = node.args[0] if node.args else None
        if target is None or not isinstance(mutated, fx.Node) or mutated.op in ("get_attr", "placeholder"):
            continue
        if is_view(mutated) or any(is_view(u) for u in mutated.users):
            continue  # other tensors share this storage: the mutation must stay visible to them
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(target, node.args, node.kwargs)
        new.meta = dict(node.meta)
        order[new] = order[node]
        node.replace_all_uses_with(new)
        for user in list(mutated.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(mutated, new)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
    return changed
