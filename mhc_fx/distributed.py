"""FSDP2 units inside a converted model: the rewritten capture run unit by unit.

``fully_shard`` applied per layer (``for layer in model.layers: fully_shard(layer)``, then
``fully_shard(model)``) makes each layer a *unit*: its parameters are sharded
(``DTensor``) between calls, and its forward hooks all-gather them before the layer runs,
free them after it, and reduce-scatter their gradients in backward. A converted model runs one
captured graph, in which layers are no longer calls; so for such a model the guarded call
(:mod:`mhc_fx.convert.guarded`):

1. captures and guards every call in the *capture layout* (:meth:`ShardedUnits.capture_layout`):
   the units' FSDP2 hooks set aside (Dynamo cannot trace them: they are
   ``torch._dynamo.disable``\\ d; where mixed precision casts, their casts stay, traced) and each sharded parameter replaced by a *stand-in*: a plain
   ``nn.Parameter`` of the unsharded shape and dtype with no storage, so Dynamo traces the
   layers as the unsharded model and its guards see the same tensors at every call;
2. runs the rewritten capture with :class:`UnitsRunner`: the graph is split into one region per
   unit (the ops that read the unit's parameters, or values made from them alone, or call a
   module under it, and everything between them) and root regions between; each unit region runs between the unit's own FSDP2
   pre- and post-forward hooks, with the parameters the pre-forward hook has just unsharded, so
   all-gather, reshard, the backward hooks and the gradient reduce-scatter happen as in the
   unconverted model, one unit at a time.

The model itself may be a unit too (``fully_shard(model)``): its hooks run around the whole call,
as for any FSDP2 root. Not supported (``CaptureError``): units nested in other units below the
model, units of several modules (``fully_shard([a, b])``), and a unit whose ops interleave with
another unit's in the captured graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch._guards import detect_fake_mode
from torch.fx.passes.split_module import split_module

from .errors import CaptureError

#: the FSDP2 unit class: None where torch.distributed is not built in
try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch builds without distributed
    FSDPModule = None


def fsdp_units(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules of ``model`` (not ``model`` itself) that ``fully_shard`` made units of, by path."""
    if FSDPModule is None:
        return {}
    return {path: m for path, m in model.named_modules() if path and isinstance(m, FSDPModule)}


class ParamSlot(NamedTuple):
    """Where FSDP2 registers one parameter: ``module._parameters[name]``."""

    module: nn.Module
    name: str

    def get(self) -> nn.Parameter:
        return self.module._parameters[self.name]

    def set(self, value: nn.Parameter) -> None:
        self.module._parameters[self.name] = value


class ShardedUnits:
    """The FSDP2 units of a converted model and the two layouts its call switches between.

    Attributes:
        units: unit path → unit module (the model's own unit excluded); owner: ``id(stand-in)`` →
        (unit path, slot) for the stand-in of each of the units' parameters.
    """

    def __init__(self, units: dict[str, nn.Module]) -> None:
        self.units = units
        for path, unit in units.items():
            state = unit._get_fsdp_state()
            if len(state._modules) != 1:
                raise CaptureError(
                    f"{path} is an FSDP2 unit of {len(state._modules)} modules (fully_shard([...])); a converted model "
                    "supports units of one module. Fix: fully_shard each module on its own"
                )
            outer = [p for p in units if p != path and path.startswith(p + ".")]
            if outer:
                raise CaptureError(
                    f"FSDP2 unit {path} is nested in unit {outer[0]}; a converted model supports one level of units "
                    "below the model. Fix: fully_shard either the outer module or the inner ones"
                )
        self._slots: list[tuple[list[ParamSlot], nn.Parameter]] = []  # (where a parameter is registered, its stand-in)
        self.owner: dict[int, tuple[str, ParamSlot]] = {}
        for path, unit in units.items():
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    info = fsdp_param._module_info
                    slots = [ParamSlot(info.module, info.param_name)]
                    slots += [ParamSlot(m, n) for m, n in zip(info.shared_modules, info.shared_param_names)]
                    standin = _standin(fsdp_param, path)
                    self._slots.append((slots, standin))
                    self.owner[id(standin)] = (path, slots[0])
        self.hooks = {path: _FsdpHooks(unit) for path, unit in units.items()}

    @contextlib.contextmanager
    def capture_layout(self) -> Iterator[None]:
        """The units' FSDP2 hooks set aside and their parameters replaced by stand-ins for the
        duration of a guarded call: Dynamo's guards and captures see this layout."""
        self._to_capture()
        try:
            yield
        finally:
            self._to_fsdp()

    @contextlib.contextmanager
    def fsdp_layout(self) -> Iterator[None]:
        """Inside :meth:`capture_layout`: FSDP2's own layout (its hooks, the parameters it had
        registered) while the captured graph runs, then the capture layout again for the rest of
        Dynamo's frame."""
        self._to_fsdp()
        try:
            yield
        finally:
            self._to_capture()

    def _to_capture(self) -> None:
        self._registered = [[slot.get() for slot in slots] for slots, _ in self._slots]
        for (slots, standin), values in zip(self._slots, self._registered):
            standin.requires_grad_(values[0].requires_grad)  # freezing a parameter is a new capture, as unsharded
            for slot in slots:
                slot.set(standin)
        for hooks in self.hooks.values():
            hooks.remove()

    def _to_fsdp(self) -> None:
        for hooks in self.hooks.values():
            hooks.restore()
        for (slots, _), values in zip(self._slots, self._registered):
            for slot, value in zip(slots, values):
                slot.set(value)


class _FsdpHooks:
    """FSDP2's forward pre- and post-hook of one unit, set aside for a capture and put back.

    Where the unit's ``MixedPrecisionPolicy`` casts the layer's inputs (``param_dtype`` with
    ``cast_forward_inputs``) or outputs (``output_dtype``), the hook is replaced, at its place,
    by one that only casts — FSDP2's own cast functions, which Dynamo traces — so the capture
    casts exactly what the layer's call receives and returns; :meth:`run_without_casts` then
    keeps the FSDP2 hooks from casting a second time at run time."""

    def __init__(self, unit: nn.Module) -> None:
        state = self.state = unit._get_fsdp_state()
        policy = state._mp_policy
        casts_inputs = policy.cast_forward_inputs and policy.param_dtype is not None
        self.entries = [
            (
                unit._forward_pre_hooks,
                state._pre_forward_hook_handle.id,
                (lambda module, args, kwargs: state._cast_forward_inputs(args, kwargs)) if casts_inputs else None,
            ),
            (
                unit._forward_hooks,
                state._post_forward_hook_handle.id,
                (lambda module, args, output: state._cast_output_dtype(output)) if policy.output_dtype is not None else None,
            ),
        ]
        self.no_casts = dataclasses.replace(policy, cast_forward_inputs=False, output_dtype=None)
        self.removed: list[tuple[int, Any]] = []

    def remove(self) -> None:
        self.removed = []
        for hooks, key, cast_only in self.entries:
            self.removed.append((list(hooks).index(key), hooks[key]))
            if cast_only is None:
                del hooks[key]
            else:
                hooks[key] = cast_only  # same place in the dict

    def restore(self) -> None:
        for (hooks, key, cast_only), (position, hook) in zip(self.entries, self.removed):
            if cast_only is not None:
                hooks[key] = hook
                continue
            items = list(hooks.items())
            items.insert(position, (key, hook))
            hooks.clear()
            hooks.update(items)

    @contextlib.contextmanager
    def run_without_casts(self) -> Iterator[None]:
        """FSDP2's hooks without their casts (the capture holds them)."""
        policy, self.state._mp_policy = self.state._mp_policy, self.no_casts
        try:
            yield
        finally:
            self.state._mp_policy = policy


def _standin(fsdp_param: Any, unit: str) -> nn.Parameter:
    """A storage-less ``nn.Parameter`` of the unsharded shape, dtype and device of ``fsdp_param``.

    Raises:
        CaptureError: the unsharded parameter is not a plain tensor (FSDP2 with tensor
        parallelism, or an all-gather extension such as float8 training).
    """
    sharded = fsdp_param.sharded_param
    local = getattr(sharded, "_local_tensor", sharded)
    if fsdp_param.is_dtensor or hasattr(local, "fsdp_pre_all_gather"):
        raise CaptureError(
            f"FSDP2 unit {unit} gathers a parameter into a tensor subclass (tensor parallelism or an all-gather "
            "extension such as float8); a converted model supports units whose gathered parameters are plain "
            "tensors. Fix: shard those layers without the extension, or shard the whole model as one unit"
        )
    param_dtype = fsdp_param.mp_policy.param_dtype
    dtype = param_dtype if param_dtype is not None and sharded.is_floating_point() else sharded.dtype
    data = torch.empty(fsdp_param._orig_size, dtype=dtype, device=fsdp_param.device)
    data.untyped_storage().resize_(0)
    return nn.Parameter(data, requires_grad=sharded.requires_grad)


#: compiles one region of a split capture: ``(region, example inputs) → callable``
RegionCompiler = Callable[[fx.GraphModule, list], Callable]


class UnitsRunner:
    """Runs a rewritten capture (a pre-dispatch ATen graph from :mod:`mhc_fx.graph.capture`, with the
    connection modules as ``call_module`` nodes) of a model with FSDP2 units, unit by unit.

    Called as Dynamo calls a compiled graph: with the graph's inputs, in which each sharded
    parameter is its stand-in (:meth:`ShardedUnits.capture_layout`). Each unit region gets the
    parameters registered on the unit once its FSDP2 pre-forward hook has run.

    Args:
        gm: the rewritten capture; example_inputs: the inputs it was captured with (the stand-ins
        among them name the units' parameters); units: the model's units; compile_region: what
        runs a region, given the region and its example inputs (fake tensors, symbolic sizes).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list, units: ShardedUnits, compile_region: RegionCompiler) -> None:
        self.units = units
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.slots: dict[fx.Node, tuple[str, ParamSlot]] = {
            node: units.owner[id(x)] for node, x in zip(placeholders, example_inputs) if id(x) in units.owner
        }
        region = _regions(gm, self.slots, list(units.units))
        self.split = split_module(gm, gm, lambda node: region[node][0], keep_original_order=True, tuple_return=True)
        self.region_unit = {f"submod_{index}": unit for index, unit in region.values()}
        self.param_args: dict[str, dict[int, ParamSlot]] = {}
        originals = {node.name: node for node in placeholders}
        for node in self.split.graph.nodes:
            if node.op == "call_module":
                self.param_args[node.target] = {
                    i: self.slots[originals[a.name]][1]
                    for i, a in enumerate(node.args)
                    if isinstance(a, fx.Node) and a.op == "placeholder" and originals.get(a.name) in self.slots
                }
        values = _fake_values(gm, example_inputs)
        # compiled now, inside Dynamo's backend call: its fake mode and shape environment give the
        # regions the capture's symbolic sizes (a dynamic decode graph stays dynamic in every region)
        self.compiled = {
            target: compile_region(region, [values[p.name] for p in region.graph.find_nodes(op="placeholder")])
            for target, region in self.split.named_children()
        }

    def __call__(self, *args: Any) -> Any:
        with self.units.fsdp_layout():
            return _UnitInterpreter(self).run(*args)

    def run_region(self, target: str, args: tuple) -> Any:
        """Run region ``target`` on ``args``; a unit region between its unit's FSDP2 hooks."""
        unit_path = self.region_unit.get(target)
        if unit_path is None:
            return self.compiled[target](*args)
        unit = self.units.units[unit_path]
        state = unit._get_fsdp_state()
        params = self.param_args[target]
        inputs = tuple(a for i, a in enumerate(args) if i not in params)
        with self.units.hooks[unit_path].run_without_casts():
            inputs, _ = state._pre_forward(unit, inputs, {})
            values = iter(inputs)
            full = tuple(params[i].get() if i in params else next(values) for i in range(len(args)))
            return state._post_forward(unit, inputs, self.compiled[target](*full))


def _fake_values(gm: fx.GraphModule, example_inputs: list) -> dict[str, Any]:
    """Every node's value in the capture's fake mode (symbolic sizes kept, and which values
    require gradients), by node name: the rewrite's new nodes carry none, so the graph is run
    again on fake inputs (``FakeTensorProp`` would record detached values)."""
    inputs = [node.meta["val"] for node in gm.graph.find_nodes(op="placeholder")]  # make_fx's: no requires_grad
    fake_mode = detect_fake_mode(inputs)
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            values[node.name] = super().run_node(node)
            return values[node.name]

        def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:  # constants as fakes
            value = super().get_attr(target, args, kwargs)
            return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

        def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:  # the module's tensors as fakes
            module = self.fetch_attr(target)
            state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            fakes = {name: fake_mode.from_tensor(t) for name, t in state.items()}
            return torch.func.functional_call(module, fakes, args, kwargs)

    grad = torch.is_grad_enabled()
    with fake_mode:
        inputs = [
            val.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and x.is_floating_point() else val
            for val, x in zip(inputs, example_inputs)
        ]
        try:
            Recorder(gm).run(*inputs)
        finally:
            torch.set_grad_enabled(grad)
    return values


class _UnitInterpreter(fx.Interpreter):
    """Runs the split graph's regions through :meth:`UnitsRunner.run_region`."""

    def __init__(self, runner: UnitsRunner) -> None:
        super().__init__(runner.split)
        self.runner = runner

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        return self.runner.run_region(target, args)


def _unit_of(path: str, units: list[str]) -> str | None:
    """The unit whose module holds ``path`` (a module path), or None."""
    return next((u for u in units if path == u or path.startswith(u + ".")), None)


def _regions(gm: fx.GraphModule, slots: dict[fx.Node, tuple[str, ParamSlot]], units: list[str]) -> dict[fx.Node, tuple[int, str | None]]:
    """Region index and unit (None for the root) of every non-placeholder node of ``gm``.

    A unit's region spans its *anchors* — ops reading one of its parameters or a value computed
    from its parameters alone (a transpose, a view), calls of modules under it — and everything
    between them in graph order; between units, root regions.

    Raises:
        CaptureError: two units' regions interleave.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    order = {n: i for i, n in enumerate(nodes)}
    spans: dict[str, list[int]] = {}
    derived = {node: unit for node, (unit, _) in slots.items()}  # a unit's parameters and values made from them alone
    for node in nodes:
        anchored = {derived[a] for a in node.all_input_nodes if a in derived}
        if len(anchored) == 1 and all(a in derived for a in node.all_input_nodes):
            derived[node] = next(iter(anchored))  # `w.t()`: its readers need the unit's parameters gathered too
        if node.op == "call_module" and (unit := _unit_of(node.target, units)) is not None:
            anchored.add(unit)
        for unit in anchored:
            span = spans.setdefault(unit, [order[node], order[node]])
            span[1] = order[node]
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (a, (_, a_end)), (b, (b_start, _)) in zip(ordered, ordered[1:]):
        if b_start <= a_end:
            raise CaptureError(
                f"the ops of FSDP2 units {a} and {b} interleave in the converted model's graph, so neither can run "
                "as one unsharded region. Fix: fully_shard a module that holds both"
            )
    region: dict[fx.Node, tuple[int, str | None]] = {}
    index, spans_left = 0, iter(ordered)
    current = next(spans_left, None)
    for i, node in enumerate(nodes):
        if current is not None and i == current[1][0]:
            index += 1
        region[node] = (index, current[0] if current is not None and current[1][0] <= i <= current[1][1] else None)
        if current is not None and i == current[1][1]:
            index += 1
            current = next(spans_left, None)
    return region
