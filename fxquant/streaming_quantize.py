"""`fxquant quantize` without the model in memory: the architecture is built on the meta device
(as `fxquant plan` builds it), planned as `save_quantized` plans it, and the input's safetensors
files are read one tensor at a time (each through its own `safe_open`, so no file stays mapped),
each planned weight quantized as it is read, and the output written shard by shard
(fxquant/checkpoint_writer.py). Peak memory is a few tensors (`workers` of them in flight), never
the model; the output is bit for bit what `save_quantized(load_model(dir_in))` writes.

    plan = streaming_plan(dir_in, cls, hf_config, config)      # NotStreamable: load the model instead
    metadata = write_streamed(plan, dir_out, ...)

The input is streamed when its files hold the model's tensors under the model's own names (ties
aside) or names transformers' renamings turn into them (read from its conversion mapping: ViT's
`attention.attention.query`, Mixtral's `block_sparse_moe`), as save_pretrained writes them, or, for a transformers MoE model's fused expert weights, one
float tensor per expert under the names HF checkpoints use (fxquant/checkpoint_experts.py): each
expert is then read, quantized and written on its own (the output's per-expert layout), so memory
holds one expert, not the [E, N, K] tensor; expert weights left unquantized are read whole and
written fused, as save_quantized writes them. Otherwise transformers' loader is the one that knows what
to do with it (other fused tensors, a base model's weights under a head's names, pickle files),
and the caller loads the model whole: NotStreamable says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from fxquant import checkpoint_experts
from fxquant.checkpoint import hf_model_config, layer_bytes, ordered_state, plan_rows, write_checkpoint
from fxquant.checkpoint_experts import ExpertTensor, expert_tensors, plan_experts, renamed_by_transformers
from fxquant.checkpoint_layers import file_tensors, is_conv1d, plan_modules, stored_layout
from fxquant.checkpoint_metadata import HF_CONFIG_FILE, METADATA_FILE, check_config, read_header, tensor_key
from fxquant.checkpoint_writer import Piece
from fxquant.config import QuantConfig
from fxquant.empty_weights import empty_weights
from fxquant.footprint import nbytes
from fxquant.hf_formats import hf_quantization_config
from fxquant.passes.plan_linears import Plan
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.shards import INDEX_FILE, WEIGHTS_FILE

# Files of an HF model directory that hold weights (of any framework) or that the output writes itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
WRITTEN_HERE = (HF_CONFIG_FILE, METADATA_FILE)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NotStreamable(Exception):
    """The input cannot be read tensor by tensor under the model's names (the message says why)."""


@dataclass(frozen=True)
class StreamingPlan:
    """What streaming `dir_in` needs: the meta model, its plan, where each input tensor lies, the input's
    (dtype, shape) of each state dict name, the ties and the config."""

    dir_in: Path
    model: nn.Module
    plan: Plan
    config: QuantConfig
    file_of: dict[str, str]  # input tensor (by the model's name for it) → its file
    state: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # the model's state dict names, as the input holds them
    source: dict[str, str]  # state dict name → the input tensor it is read from (a tied name: its twin's)
    experts: dict[str, ExpertTensor]  # fused expert weights the input holds one tensor per expert and part
    input_names: dict[str, str]  # the model's name → the input's, where transformers renames it (Mixtral's block_sparse_moe)

    def read(self, name: str) -> Tensor:
        """The input tensor the model calls `name`."""
        return read_tensor(self.dir_in / self.file_of[name], self.input_names.get(name, name))

    @property
    def input_bytes(self) -> int:
        return sum(nbytes(*self.state[name]) for name in set(self.source.values()) if name in self.state)


def input_files(directory: Path) -> dict[str, str]:
    """{tensor: file} of a safetensors model directory (index or model.safetensors); NotStreamable otherwise."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"fxquant: {directory / INDEX_FILE}: no weight_map")
        return weight_map
    if (directory / WEIGHTS_FILE).is_file():
        return dict.fromkeys(read_header(directory / WEIGHTS_FILE), WEIGHTS_FILE)
    raise NotStreamable(f"{directory} holds no safetensors weights (pickle files are loaded whole)")


def _identities(model: nn.Module) -> dict[str, int]:
    return {name: id(t) for name, t in [*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False)]}


def _with_input_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give the meta model's parameters the input's dtypes (tied ones stay one Parameter), so that the
    plan judges the weights the input holds, as it would for the model transformers loads."""
    made: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        dtype = dtypes.get(name, param.dtype)
        if id(param) not in made:
            made[id(param)] = param if dtype == param.dtype else nn.Parameter(
                torch.empty(param.shape, dtype=dtype, device="meta"), requires_grad=param.requires_grad)
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = made[id(param)]


def streaming_plan(dir_in: Path, cls: type[nn.Module], hf_config: object, config: QuantConfig) -> StreamingPlan:
    """Plan streaming `dir_in` into a `cls` checkpoint; NotStreamable where the input's names are not
    the model's, an error naming the file and tensor where its shapes or dtypes cannot be."""
    check_config(config)
    inputs = input_files(dir_in)
    with empty_weights():
        model = cls(hf_config).eval()
    renamed = renamed_by_transformers(model, inputs)
    if len(set(renamed.values())) < len(renamed):
        raise NotStreamable("transformers' renaming makes two of its tensors one")
    file_of = {renamed[name]: file for name, file in inputs.items()}
    input_names = {renamed[name]: name for name in inputs if renamed[name] != name}
    state_names = list(model.state_dict())
    identity = _identities(model)
    computed = set(dict(model.named_buffers())) - set(state_names)
    twins: dict[int, str] = {}
    for name in state_names:
        if name in file_of:
            twins.setdefault(identity[name], name)
    experts = {name: expert for name, expert in expert_tensors(model).items()
               if name not in file_of and all(part in file_of for part in expert.file_names("weight"))}
    source = {name: name if name in file_of or name in experts else twins.get(identity[name]) for name in state_names}
    missing = sorted(name for name, found in source.items() if found is None)
    per_expert = {part for expert in experts.values() for part in expert.file_names("weight")}
    unexpected = sorted(set(file_of) - set(state_names) - computed - per_expert)
    if missing or unexpected:
        shown = (missing or unexpected)[:3]
        raise NotStreamable(f"its tensor names are not {cls.__name__}'s ({'missing' if missing else 'unexpected'}: "
                            f"{', '.join(shown)}{' ...' if len(missing or unexpected) > 3 else ''})")
    headers = {file: read_header(dir_in / file) for file in sorted(set(file_of.values()))}
    meta_state = model.state_dict()
    state = {}
    for name in state_names:
        if name in experts:
            state[name] = _expert_input(dir_in, experts[name], file_of, headers, input_names)
            continue
        file, stored = file_of[source[name]], input_names.get(source[name], source[name])
        if stored not in headers[file]:
            raise ValueError(f"fxquant: {dir_in / file}: no tensor '{stored}' ({INDEX_FILE} puts it there)")
        dtype, shape = headers[file][stored]
        wanted = tuple(meta_state[name].shape)
        if shape != wanted:
            raise ValueError(f"fxquant: {dir_in / file}: tensor '{stored}' is {list(shape)}; {cls.__name__} needs {list(wanted)}")
        if meta_state[name].is_floating_point() and dtype not in INPUT_DTYPES:
            raise ValueError(f"fxquant: {dir_in / file}: tensor '{stored}' is {dtype}; fxquant quantizes float16, "
                             "bfloat16 and float32 models")
        state[name] = (dtype, shape)
    _with_input_dtypes(model, {name: spec[0] for name, spec in state.items()})
    plan = plan_modules(model, config)
    plan.extend(plan_experts(model, config))
    return StreamingPlan(dir_in, model, plan, config, file_of, state, source, experts, input_names)


def _expert_input(dir_in: Path, expert: ExpertTensor, file_of: dict[str, str], headers: dict,
                  input_names: dict[str, str]) -> tuple[torch.dtype, tuple]:
    """(dtype, [E, N, K]) of an expert weight the input holds per expert: each part's tensor [N / parts, K],
    all of one float dtype; an error naming the file and tensor otherwise."""
    rows, k = expert.shape[1] // len(expert.parts), expert.shape[2]
    dtypes = set()
    for part in expert.file_names("weight"):
        name = input_names.get(part, part)
        dtype, shape = headers[file_of[part]].get(name, (None, None))
        if shape != (rows, k) or dtype not in INPUT_DTYPES:
            found = "absent" if shape is None else f"{dtype} {list(shape)}"
            raise ValueError(f"fxquant: {dir_in / file_of[part]}: tensor '{name}' is {found}; {expert.name} "
                             f"{list(expert.shape)} needs float16, bfloat16 or float32 [{rows}, {k}] per expert and part")
        dtypes.add(dtype)
    if len(dtypes) > 1:
        raise ValueError(f"fxquant: {dir_in}: the experts of {expert.name} are stored in {sorted(map(str, dtypes))}; want one dtype")
    return dtypes.pop(), expert.shape


def read_tensor(path: Path, name: str) -> Tensor:
    """One tensor of a safetensors file, the file mapped only while it is read."""
    with safe_open(path, framework="pt") as file:
        return file.get_tensor(name)


def _pieces(plan: StreamingPlan) -> tuple[list[Piece], dict[str, tuple], dict[str, str]]:
    """The pieces of the output in save_quantized's order, the stored layout {name: (dtype, shape)} and the ties."""
    def read_expert(expert: ExpertTensor, e: int) -> Tensor:
        """Expert e's [N, K] weight: its parts (gate, up) read one by one and joined along N."""
        parts = [expert.file_name(p, e, "weight") for p in range(len(expert.parts))]
        return torch.cat([plan.read(part) for part in parts])

    def read(name: str) -> Tensor:
        if name in plan.experts:  # an expert weight left unquantized: written fused, as the model holds it
            expert = plan.experts[name]
            return torch.stack([read_expert(expert, e) for e in range(expert.shape[0])])
        return plan.read(plan.source[name])

    replaced, makers, expert_pieces = {}, {}, {}
    modules = dict(plan.model.named_modules())
    for entry in plan.plan.rewritten:
        expert = getattr(entry, "expert", None)
        if expert is not None:  # one piece per expert: read, quantized and written alone
            replaced[entry.layer] = checkpoint_experts.file_layout(expert, entry.scheme, entry.options)
            expert_pieces[entry.layer] = [_expert_piece(entry, expert, e, read_expert) for e in range(expert.shape[0])]
            continue
        weight, conv1d = tensor_key(entry.layer, "weight"), is_conv1d(modules[entry.layer])
        layout = stored_layout(entry.scheme, entry.site.out_features, entry.site.in_features, entry.options, conv1d)
        replaced[weight] = {tensor_key(entry.layer, attr): spec for attr, spec in layout.items()}

        def make(entry=entry, weight=weight, conv1d=conv1d) -> dict[str, Tensor]:
            tensors = quantize_parameter(entry.layer, read(weight), entry.site.weight_is_kn, entry.scheme, entry.options)
            return {tensor_key(entry.layer, attr): t for attr, t in file_tensors(entry.scheme, tensors, conv1d).items()}

        makers[weight] = make
    identity = _identities(plan.model)
    quantized = set(replaced)
    first: dict[int, str] = {}
    tied = {}
    for name in plan.state:
        if identity[name] in first and not {name, first[identity[name]]} & quantized:
            tied[name] = first[identity[name]]
        first.setdefault(identity[name], name)
    pieces = []
    for name in plan.state:
        if name in tied:
            continue
        size = nbytes(*plan.state[name])
        if name in expert_pieces:
            pieces.extend(expert_pieces[name])
        elif name in replaced:
            pieces.append(Piece(replaced[name], makers[name], size))
        else:
            pieces.append(Piece({name: plan.state[name]}, lambda name=name: {name: read(name)}, size))
    stored = ordered_state(plan.state, replaced)
    return pieces, stored, tied


def _expert_piece(entry, expert: ExpertTensor, e: int, read_expert) -> Piece:
    """The piece of expert e of a planned expert weight: its per-expert tensors, quantized from its [N, K]
    weight alone (the schemes with expert forms scale each expert on its own, so they equal the whole
    tensor's quantization, cut)."""
    single = ExpertTensor(expert.name, (1, *expert.shape[1:]), tuple(part.replace("{e}", str(e)) for part in expert.parts))
    layout = checkpoint_experts.file_layout(single, entry.scheme, entry.options)

    def make() -> dict[str, Tensor]:
        tensors = quantize_parameter(entry.layer, read_expert(expert, e).unsqueeze(0), False, entry.scheme, entry.options)
        return checkpoint_experts.file_tensors(single, entry.scheme, tensors)

    dtype = entry.site.weight.dtype
    return Piece(layout, make, nbytes(dtype, expert.shape[1:]))


def _float_bytes(plan: StreamingPlan) -> int:
    """The input state dict's bytes, a tensor held under several names once (memory_footprint's count)."""
    identity = _identities(plan.model)
    unique = {identity[name]: name for name in plan.state}
    return sum(nbytes(*plan.state[name]) for name in unique.values())


def extra_files(directory: Path) -> list[Path]:
    """The input's files that are not weights nor written by the output (tokenizer, generation config,
    chat template, README, ...), and its directories that hold no weights; hidden ones left out."""
    def is_weights(path: Path) -> bool:
        return path.name.endswith(WEIGHT_SUFFIXES)

    chosen = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.name in WRITTEN_HERE or is_weights(path):
            continue
        if path.is_dir() and any(is_weights(inner) for inner in path.rglob("*")):
            continue
        chosen.append(path)
    return chosen


def write_streamed(
    plan: StreamingPlan, dir_out: Path, hf_config: object, architecture: str, hf_format: str | None, *,
    overwrite: bool = False, max_shard_size: int | str, workers: int = 1, advance=None,
) -> dict:
    """Write the checkpoint of `plan` into `dir_out` (see the module docstring); what fxquant.json holds."""
    pieces, stored, tied = _pieces(plan)
    quantization_config = hf_quantization_config(hf_format, plan.plan, plan.config)
    before = _float_bytes(plan)
    return write_checkpoint(
        dir_out, pieces, config=plan.config, plan=plan_rows(plan.plan, layer_bytes(plan.plan, _specs(plan.state), stored)),
        tied=tied, before=before, quantization_config=quantization_config,
        hf_config=hf_model_config(hf_config, architecture, quantization_config), extra_files=extra_files(plan.dir_in),
        overwrite=overwrite, max_shard_size=max_shard_size, workers=workers, advance=advance,
    )


def _specs(state: dict[str, tuple]) -> dict[str, Tensor]:
    """(dtype, shape) pairs as meta tensors, for helpers that read `.dtype` and `.shape`."""
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape) in state.items()}
