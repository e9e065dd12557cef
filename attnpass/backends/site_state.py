"""A traced site module's state (routing's centroids, ...) as inputs of the graph it is compiled in.

The compile backend adds its site modules to a graph after dynamo, which knows nothing of their
parameters and buffers: left as a `call_module`, AOT autograd fails to lift them (`... not found
in param_name_to_source`). So each such call becomes a call of the module with its state swapped in
from new graph inputs (`torch.func.functional_call`), and the compiled graph is called with the
module's current tensors appended to dynamo's inputs. The state is read at every call, so
`load_state_dict`, calibration or an EMA step between calls reach the compiled graph, as they reach
an eager site; the module stays attached to the model (state_dict keys unchanged).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn


class _CallWithState:
    """`module(*args, **kwargs)` with its parameters and buffers (by name) taken from `state`."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module, self.names = module, names
        self.__name__ = f"{type(module).__name__}_with_state"  # fx names the call after it

    def __call__(self, state, *args, **kwargs):
        return torch.func.functional_call(self.module, dict(zip(self.names, state)), args, kwargs)


class SiteState:
    """The state tensors of the site modules a graph holds, in the order of the inputs added for them."""

    def __init__(self):
        # (owning module, attribute): read at every call, since `.to()` or an assignment replaces the
        # tensor; resolved once, so a call reads attributes and walks no module tree
        self.slots: list[tuple[nn.Module, str]] = []

    def add(self, module: nn.Module, names: list[str]) -> None:
        for name in names:
            path, _, attr = name.rpartition(".")
            self.slots.append((module.get_submodule(path), attr))

    def tensors(self) -> list[torch.Tensor]:
        """The modules' current tensors."""
        return [getattr(owner, attr) for owner, attr in self.slots]

    def appended(self, compiled):
        """`compiled`, called with dynamo's inputs and then the modules' state."""
        if not self.slots:
            return compiled

        def run(*args):
            return compiled(*args, *self.tensors())

        return run


def holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def state_as_inputs(gm: fx.GraphModule, calls: list[fx.Node]) -> tuple[fx.GraphModule, SiteState]:
    """A copy of `gm` whose `call_module` nodes `calls` (by name) with a module holding state take it from
    new placeholders (after dynamo's), those modules left out of it; and where the state is read. `gm`
    itself is returned when no call holds state."""
    stateful = [n.name for n in calls if holds_state(gm.get_submodule(n.target))]
    state = SiteState()
    if not stateful:
        return gm, state
    # a copy: dynamo reads the placeholders of the graph it handed over after the backend returns
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    nodes = {n.name: n for n in gm.graph.nodes}
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node in (nodes[name] for name in stateful):
        module = gm.get_submodule(node.target)
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        inputs = []
        for name in names:
            with gm.graph.inserting_after(last):
                last = gm.graph.placeholder(f"{node.target}_{name.replace('.', '_')}")
            inputs.append(last)
        target = node.target
        node.op, node.target = "call_function", _CallWithState(module, names)
        node.args = (tuple(inputs), *node.args)
        gm.delete_submodule(target)
        state.add(module, names)
    gm.recompile()
    return gm, state
