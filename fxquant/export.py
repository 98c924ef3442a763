"""`fxquant.export`: a `torch.export.ExportedProgram` whose linear layers are fxquant ops.

    program = fxquant.export(model, (x,), config=QuantConfig(scheme="fp8_rowwise"))
    torch.export.save(program, "model.pt2");  program = fxquant.load_program("model.pt2")
    package = fxquant.aoti_compile_and_package(program)                  # AOTInductor (fxquant/aoti.py)

The same passes as the backend run on the aten-level exported graph. Their quantized tensors (each
scheme's: weight, scale, ...) become buffers of the program (placeholders with BUFFER input specs, in its state dict),
and the parameters only the rewritten layers used leave the graph, its signature and its state
dict, so the program holds the low-precision weights only.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument

from fxquant.config import QuantConfig
from fxquant.passes import Plan
from fxquant.passes.quantize_weights import QuantizedWeight
from fxquant.pipeline import quantize_graph


def export(
    model: torch.nn.Module,
    args: tuple,
    kwargs: Mapping | None = None,
    config: QuantConfig | None = None,
    dynamic_shapes=None,
    strict: bool = False,
) -> ExportedProgram:
    """torch.export `model`, then quantize its linear layers; the result's `.fxquant_plan` is the plan
    and `.fxquant_config` the config (what `fxquant.save_quantized` needs to checkpoint it)."""
    config = config or QuantConfig()
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=strict)
    quantized_program, plan = quantize_program(program, config)
    quantized_program.fxquant_plan = plan
    quantized_program.fxquant_config = config
    return quantized_program


def quantize_program(program: ExportedProgram, config: QuantConfig) -> tuple[ExportedProgram, Plan]:
    """Run fxquant's passes on a copy of an exported program; returns the new program and the plan."""
    gm = _copy_graph_module(program.graph_module)
    signature = program.graph_signature
    state_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}  # placeholder → qualified name
    state_dict = dict(program.state_dict)

    def lookup(node: fx.Node):
        name = state_names.get(node.name) if node.op == "placeholder" else None
        return None if name is None or name not in state_dict else (name, state_dict[name])

    unused_before = {node.name for node in gm.graph.find_nodes(op="placeholder") if not node.users}  # e.g. tied aliases
    plan, quantized = quantize_graph(gm, lookup, config)
    input_specs = _lift_buffers(gm, program.graph_signature.input_specs, quantized, state_dict)
    input_specs = _drop_unused_parameters(gm, input_specs, state_dict, unused_before)
    gm.recompile()
    new_signature = ExportGraphSignature(input_specs=input_specs, output_specs=_output_specs(gm, signature.output_specs))
    new_program = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=new_signature,
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=program.constants,
        verifiers=program.verifiers,
    )
    return new_program, plan


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of `gm` whose nodes keep their names. Copying a graph renames a node named after a
    Python builtin (`input` → `input_1`, as torch.export names a `forward(input)` argument), and the
    program's signature, module call graph and users' kwargs name the originals."""
    copied = copy.deepcopy(gm)
    for original_module, copied_module in zip(gm.modules(), copied.modules()):
        if isinstance(original_module, fx.GraphModule):
            for original, node in zip(original_module.graph.nodes, copied_module.graph.nodes):
                node.name = original.name
            copied_module.recompile()
    return copied


def _lift_buffers(
    gm: fx.GraphModule, input_specs: list[InputSpec], quantized: list[QuantizedWeight], state_dict: dict
) -> list[InputSpec]:
    """get_attr of fxquant's buffers → BUFFER placeholders after the existing parameters and buffers."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    n_state = sum(spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) for spec in input_specs)
    anchor = placeholders[n_state] if n_state < len(placeholders) else next(n for n in graph.nodes if n.op != "placeholder")
    new_specs = []
    for q in quantized:
        q.attrs = {name: _lift_buffer(gm, attr, anchor, state_dict, new_specs) for name, attr in q.attrs.items()}
    return input_specs[:n_state] + new_specs + input_specs[n_state:]


def _lift_buffer(gm: fx.GraphModule, attr: str, anchor: fx.Node, state_dict: dict, specs: list[InputSpec]) -> str:
    """Buffer `attr` of `gm` → a placeholder before `anchor` and an entry of `state_dict` (under `attr`,
    or `attr_1`... where the model's own state holds that name); appends its spec, returns its name."""
    graph = gm.graph
    users = [n for n in graph.find_nodes(op="get_attr") if n.target == attr]
    tensor = getattr(gm, attr)
    delattr(gm, attr)
    if not users:  # a scale folded into constants (static fp8_tensorwise)
        return attr
    target, n = attr, 0
    while target in state_dict:
        n += 1
        target = f"{attr}_{n}"
    with graph.inserting_before(anchor):
        placeholder = graph.placeholder(f"b_{target}")
    placeholder.target = placeholder.name  # the unique name the graph gave it is the argument's name in forward
    placeholder.meta.update(users[0].meta)
    for node in users:
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
    state_dict[target] = tensor
    specs.append(InputSpec(InputKind.BUFFER, TensorArgument(placeholder.name), target=target, persistent=True))
    return target


def _output_specs(gm: fx.GraphModule, output_specs: list[OutputSpec]) -> list[OutputSpec]:
    """The output specs, naming the graph's outputs as they are now: a layer whose output the model
    returns as is was replaced by a new node (fxquant's op)."""
    (output,) = gm.graph.find_nodes(op="output")
    return [
        dataclasses.replace(spec, arg=TensorArgument(node.name)) if isinstance(spec.arg, TensorArgument) else spec
        for spec, node in zip(output_specs, output.args[0])
    ]


def _drop_unused_parameters(
    gm: fx.GraphModule, input_specs: list[InputSpec], state_dict: dict, unused_before: set[str]
) -> list[InputSpec]:
    """Parameters whose placeholders lost every user (the rewritten layers' float weights) leave the
    program; those torch.export left unused (the second name of a tied weight) stay, as it keeps them."""
    unused = {node.name: node for node in gm.graph.find_nodes(op="placeholder") if not node.users and node.name not in unused_before}
    kept = []
    for spec in input_specs:
        if spec.kind == InputKind.PARAMETER and spec.arg.name in unused:
            gm.graph.erase_node(unused[spec.arg.name])
            del state_dict[spec.target]
        else:
            kept.append(spec)
    return kept


def load_program(path: str | Path) -> ExportedProgram:
    """torch.export.load for programs holding fxquant ops (importing fxquant registers them)."""
    return torch.export.load(path)
