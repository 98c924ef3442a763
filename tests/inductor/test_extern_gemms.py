"""The extern GEMM choices of fp8_rowwise_mm's lowering (fxquant/inductor/fp8_rowwise_mm.py): each
carries an op overload of the GEMM's signature (fxquant/ops/fp8_rowwise.py); a Python wrapper calls
the function under the choice's name, a C++ wrapper (AOTInductor) the op."""

import pytest
import torch
from torch import fx
from torch._inductor import ir
from torch._inductor.graph import GraphLowering
from torch._inductor.virtualized import V
from torch._subclasses.fake_tensor import FakeTensorMode

from fxquant.inductor.fp8_rowwise_mm import by_rows_choice, fbgemm_choice, scaled_mm_choice, splitk_choice
from fxquant.ops import fp8_rowwise
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

# choice → (its name in a Python wrapper's code, the function it calls there, the op a C++ wrapper calls)
EXTERN_GEMMS = {
    scaled_mm_choice: ("fxquant_scaled_mm", fp8_rowwise.scaled_mm_rowwise, "fxquant::scaled_mm_rowwise"),
    fbgemm_choice: ("fxquant_fbgemm_f8f8bf16_rowwise", fp8_rowwise.fbgemm_rowwise_mm, "fxquant::fbgemm_rowwise_mm"),
    by_rows_choice: ("fxquant_rowwise_mm_by_rows", fp8_rowwise.rowwise_mm_by_rows, "fxquant::fp8_rowwise_mm"),
    splitk_choice: ("fxquant_fp8_rowwise_mm_splitk", fp8_rowwise.fp8_rowwise_mm_splitk, "fxquant::fp8_rowwise_mm_splitk"),
}
CHOICE_IDS = [name for name, *_ in EXTERN_GEMMS.values()]


@pytest.mark.parametrize("choice", EXTERN_GEMMS, ids=CHOICE_IDS)
def test_each_choice_carries_an_op_of_the_gemms_signature(choice):
    name, function, op = EXTERN_GEMMS[choice]
    assert choice.name == name and choice.to_callable() is function
    assert choice.op_overload.name() == op
    assert [a.name for a in choice.op_overload._schema.arguments] == ["x_q", "w_q", "x_scale", "w_scale"]
    with FakeTensorMode():
        x_q, w_q = torch.empty(8, 64, dtype=torch.float8_e4m3fn), torch.empty(32, 64, dtype=torch.float8_e4m3fn)
        out = choice.op_overload(x_q, w_q, torch.empty(8), torch.empty(32))
    assert out.shape == (8, 32) and out.dtype == torch.bfloat16


def created_node(choice, cpp_wrapper: bool) -> ir.IRNode:
    """What the choice puts in an Inductor graph (with or without a C++ wrapper) for x_q [8, 64]."""
    graph = GraphLowering(fx.symbolic_trace(lambda x: x), cpp_wrapper=cpp_wrapper)
    sizes = {"x_q": (torch.float8_e4m3fn, [8, 64]), "w_q": (torch.float8_e4m3fn, [32, 64]),
             "x_scale": (torch.float32, [8]), "w_scale": (torch.float32, [32])}
    with V.set_graph_handler(graph), V.set_fake_mode(FakeTensorMode()):
        inputs = []
        for name, (dtype, size) in sizes.items():
            inputs.append(ir.InputBuffer(name=name, layout=ir.FixedLayout(torch.device("cpu"), dtype, size)))
            graph.graph_inputs[name] = ir.TensorBox.create(inputs[-1])
        return choice.kernel_creator(*inputs)


@pytest.mark.parametrize("choice", EXTERN_GEMMS, ids=CHOICE_IDS)
def test_a_python_wrapper_calls_the_function_and_a_cpp_wrapper_the_op(choice):
    name, _, op = EXTERN_GEMMS[choice]
    python = created_node(choice, cpp_wrapper=False)
    assert type(python) is ir.ExternKernelAlloc and python.python_kernel_name == f"extern_kernels.{name}"
    assert python.get_size() == [8, 32] and python.get_dtype() == torch.bfloat16
    cpp = created_node(choice, cpp_wrapper=True)
    [kernel] = [node for node in (cpp, *getattr(cpp, "inputs", ())) if isinstance(node, ir.FallbackKernel)]  # in a MultiOutput
    assert kernel.op_overload.name() == op and cpp.get_size() == [8, 32]


@pytest.mark.gpu
@pytest.mark.parametrize("choice", EXTERN_GEMMS, ids=CHOICE_IDS)
def test_each_op_passes_opcheck_and_equals_its_function_on_cuda(choice):
    if choice is fbgemm_choice and not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai is not installed")
    _, function, _ = EXTERN_GEMMS[choice]
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(8, 256, device="cuda"))
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(512, 256, device="cuda"))
    arguments = (x_q, w_q, x_scale, w_scale)
    # test_schema compares the inputs before and after with ops float8 lacks on CUDA ("mul_cuda")
    torch.library.opcheck(choice.op_overload, arguments, test_utils=("test_faketensor", "test_autograd_registration"))
    assert torch.equal(choice.op_overload(*arguments), function(*arguments))
