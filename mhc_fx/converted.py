"""``ConvertedModel``: the module :func:`mhc_fx.convert` returns.

It owns the model's parameter tree (original names, plus the inserted connection modules) and
runs one captured graph per mode: the training graph under ``.train()``, the inference graph
under ``.eval()`` (an exported graph bakes dropout and BatchNorm behaviour in). Both graphs
read the very same parameters and buffers, so ``state_dict`` keys are the original model's
plus the new ones, ``.to()`` moves everything once, and optimisers see each parameter once.
"""

from __future__ import annotations

import inspect

import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from .passes.units import split_units
from .report import ConversionReport


def bind_graph(tree: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule running ``graph`` whose attribute namespace *is* ``tree``'s (its
    parameters, buffers and submodules are read live, by path, at every call)."""
    gm = fx.GraphModule(tree, graph, class_name=class_name)
    for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
        object.__setattr__(gm, name, getattr(tree, name))
    return gm


class UnitForward:
    """The ``forward`` of a unit module after :meth:`ConvertedModel.split_units`: runs the
    unit's region of the train or eval graph (by the module's mode), optionally under
    ``torch.utils.checkpoint`` (activations recomputed in backward)."""

    def __init__(self, module: nn.Module, train: fx.GraphModule, eval: fx.GraphModule, checkpoint: bool) -> None:
        self.module, self.train, self.eval, self.checkpoint = module, train, eval, checkpoint

    def __call__(self, *args):
        region = self.train if self.module.training else self.eval
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=False)
        return region(*args)


class ConvertedModel(nn.Module):
    """A model whose residual connections were rewritten by :func:`mhc_fx.convert`.

    Call it like the original model: same inputs (sizes within the captured dynamic ranges),
    same output structure (Hugging Face ``ModelOutput`` included).

    Attributes:
        report: the :class:`~mhc_fx.ConversionReport` of the conversion.
        train_graph / eval_graph: the ``fx.GraphModule`` each mode runs.
        input_names: the inputs it was captured with (only these are accepted).
    """

    def __init__(self, tree: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, report: ConversionReport):
        super().__init__()
        self._parameters = tree._parameters
        self._buffers = tree._buffers
        self._non_persistent_buffers_set = tree._non_persistent_buffers_set
        self._modules = tree._modules
        self.report = report
        self.train_graph = bind_graph(self, train_graph, "TrainGraph")
        self.eval_graph = self.train_graph if eval_graph is train_graph else bind_graph(self, eval_graph, "EvalGraph")
        self.input_names = tuple(inspect.signature(self.train_graph.forward).parameters)

    def default_units(self) -> list[str]:
        """The layers holding the converted blocks, in block order: each block's owner, widened
        to the element of the innermost numbered container around it (``encoder.layer.0`` for a
        block owned by ``encoder.layer.0.attention.output``; ``model.layers.0``; ``blocks.3``)."""
        units: list[str] = []
        for block in self.report.blocks:
            parts = block.name.split(".")[:-1]
            numbered = [i for i, p in enumerate(parts) if p.isdigit()]
            unit = ".".join(parts[: numbered[-1] + 1] if numbered else parts)
            if unit and unit not in units:
                units.append(unit)
        return units

    def split_units(self, units: list[str] | None = None, *, checkpoint: bool = False) -> list[str]:
        """Make each unit (by default each block owner, with its connection modules) run as a
        call of its own module, for FSDP2 ``fully_shard`` per block, activation checkpointing
        and module hooks. Changes this model in place; its function is unchanged.

        Args:
            units: module paths, none inside another (default :meth:`default_units`).
            checkpoint: run each unit under ``torch.utils.checkpoint`` (non-reentrant) when
                gradients are enabled.

        Returns:
            the unit paths.

        Raises:
            ConversionError: a unit's ops cannot be gathered into one call.
        """
        units = list(units) if units is not None else self.default_units()
        for u in units:
            self.get_submodule(u)  # AttributeError naming a missing path
        nested = [(a, b) for a in units for b in units if b.startswith(a + ".")]
        if nested:
            raise ValueError(f"split_units: units must not contain one another, got {nested[0]}")
        graphs = {"train": self.train_graph} if self.eval_graph is self.train_graph else {
            "train": self.train_graph, "eval": self.eval_graph}
        regions: dict[str, dict[str, fx.GraphModule]] = {u: {} for u in units}
        for mode, gm in graphs.items():
            for unit, graph in split_units(gm.graph, units).items():
                regions[unit][mode] = bind_graph(self, graph, f"{mode.title()}Unit")
            gm.recompile()
        for unit, modes in regions.items():
            module = self.get_submodule(unit)
            module.forward = UnitForward(module, modes["train"], modes.get("eval", modes["train"]), checkpoint)
        return units

    def __setattr__(self, name, value):
        if name in ("train_graph", "eval_graph"):  # not submodules: they share this module's tree
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in self.input_names]
        if unknown:
            raise TypeError(
                f"the converted model was captured with inputs {self.input_names}; {unknown} were not among "
                "them. Pass every input you will use in example_inputs/example_kwargs when converting."
            )
        return (self.train_graph if self.training else self.eval_graph)(*args, **kwargs)
