"""Context switches that a capture lets a checkpointed region set and reset.

Dynamo refuses any mutation of an outer object inside an activation-checkpointed region ("HOP:
Unsafe side effect"): eager checkpointing replays the region's Python code in backward, a
compiled one recomputes only its ops, so a side effect would run once instead of twice. Its own
deferred check accepts a constant that is set and restored within the region, nothing else.

Hugging Face models set such a switch in every layer: since transformers 5.25 (which requires the
``kernels`` package) Llama-family attention runs between ``_ACTIVE_KERNEL_FUNCS.set({...})`` and
``.reset(token)`` in a ``finally``, where ``_ACTIVE_KERNEL_FUNCS`` is a ``CompileableContextVar``
that under Dynamo stores a dict of functions on a module-level object. Each mutation of it is
half of a set/reset pair around the code that reads it, so after the region it holds what it
held before, and not replaying it in backward cannot be observed. :func:`allowed_in_checkpoints`
lets exactly the mutations of these objects through, inside checkpointed regions only; every
other mutation still fails the capture (:func:`side_effect_error` says which and what to do).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator

from torch._dynamo.side_effects import SideEffects

#: classes (module, name) of the known set/reset context switches
CONTEXT_SWITCH_CLASSES = (
    ("kernels._internals.layer.layer", "CompileableContextVar"),
    ("transformers.utils.output_capturing", "CompileableContextVar"),
)
#: how Dynamo names the tracer of a checkpointed region's body
_CHECKPOINT_TRACER = "torch.utils.checkpoint.checkpoint"


def _loaded_classes() -> tuple[type, ...]:
    """The classes of :data:`CONTEXT_SWITCH_CLASSES` whose module is imported (no module, no instance)."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in CONTEXT_SWITCH_CLASSES)
    return tuple(cls for cls in found if isinstance(cls, type))


@contextlib.contextmanager
def allowed_in_checkpoints() -> Iterator[None]:
    """While active, Dynamo accepts mutations of the known context switches inside checkpointed regions."""
    classes = _loaded_classes()
    original = SideEffects.check_allowed_side_effect
    if not classes:
        yield
        return

    def check_allowed_side_effect(self: SideEffects, item) -> bool:
        output = self.output_graph_weakref()
        tracer = output.current_tx.output.current_tracer if output is not None else None
        if getattr(tracer, "description", None) == _CHECKPOINT_TRACER and isinstance(getattr(item, "value", None), classes):
            return True
        return original(self, item)

    SideEffects.check_allowed_side_effect = check_allowed_side_effect
    try:
        yield
    finally:
        SideEffects.check_allowed_side_effect = original


def is_side_effect_in_checkpoint(err: Exception) -> bool:
    """Whether Dynamo's ``err`` is its refusal of a side effect inside a higher-order op."""
    return "HOP: Unsafe side effect" in str(err) or "HOP: Non-nullified side effect" in str(err)


def side_effect_error(model_name: str, err: Exception) -> str:
    """The message for a mutation Dynamo refused inside a checkpointed region of ``model_name``:
    what was mutated (Dynamo's debug context) and the three ways out."""
    context = re.search(r"Developer debug context: (.*)", str(err))
    what = context[1].strip() if context else str(err).strip().splitlines()[0]
    return (
        f"could not capture {model_name}: code inside an activation-checkpointed region mutates state outside it "
        f"({what}); eager checkpointing would run that mutation again in backward, a captured graph cannot. Fix: "
        "move the mutation out of the checkpointed layer, or turn checkpointing off "
        "(gradient_checkpointing_disable()), or, if running it once is what you want, set "
        "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True"
    )
