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
from torch import nn

from .report import ConversionReport


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
        self.train_graph = self._bind(train_graph, "Train")
        self.eval_graph = self.train_graph if eval_graph is train_graph else self._bind(eval_graph, "Eval")
        self.input_names = tuple(inspect.signature(self.train_graph.forward).parameters)

    def _bind(self, graph: fx.Graph, mode: str) -> fx.GraphModule:
        """A GraphModule running ``graph`` whose attribute namespace *is* this module's."""
        gm = fx.GraphModule(self, graph, class_name=f"{mode}Graph")
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(gm, name, getattr(self, name))
        return gm

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
