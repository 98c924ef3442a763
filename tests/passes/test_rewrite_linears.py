"""Golden graphs of the rewrite (passes/rewrite_linears.py), each with a numerical check against eager.

The rewritten graph runs eagerly here (the ops' CPU reference), so the comparison isolates what
the passes did from Inductor. Bounds are relative errors against the unquantized fp32 model:
FP8 e4m3 keeps 3 mantissa bits (about 3-6% per layer on random weights), int8 about 1%.
"""

import torch
from expecttest import TestCase

from fxquant import QuantConfig
from tests.graphs import rewrite
from tests.models import MLP, Addmm, FunctionalLinear, MatmulOnWeight, relative_error, tiny_llama_config

FP8 = QuantConfig(scheme="fp8_rowwise")
INT8 = QuantConfig(scheme="int8")
# 32 x 32 blocks, so the small test models (K, N multiples of 32) are quantized blockwise.
BLOCKWISE = QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32))
TENSORWISE = QuantConfig(scheme="fp8_tensorwise")
BOUND = {"fp8_rowwise": 0.08, "fp8_blockwise": 0.08, "fp8_tensorwise": 0.1, "int8": 0.02}


def rewritten_lines(code: str) -> str:
    """The lines of a normalized graph that hold fxquant's constants and ops."""
    return "\n".join(line for line in code.splitlines() if "fxquant" in line)


class RewriteLinearsTest(TestCase):
    def check(self, model, *args, config, **kwargs):
        """Rewrite `model`, check its output against eager, return the normalized graph."""
        code, output, plan = rewrite(model, *args, config=config, **kwargs)
        with torch.no_grad():
            expected = model(*args, **kwargs)
        expected, output = (t[0] if isinstance(t, tuple) else t for t in (expected, output))
        error = relative_error(output, expected)
        self.assertGreater(error, 0, "the rewritten graph computes exactly the float result: nothing was quantized")
        self.assertLess(error, BOUND[config.scheme], f"{config.scheme}: relative error {error:.4f} vs eager")
        return code

    def setUp(self):
        torch.manual_seed(0)

    def test_mlp_fp8_rowwise_skips_lm_head(self):
        code = self.check(MLP(), torch.randn(2, 5, 64), config=FP8)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fxquant_up_scale = self.fxquant_up_scale
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_up_weight, fxquant_up_scale, up_bias_, None)
    gelu = torch._C._nn.gelu(fp8_rowwise_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fxquant_down_scale = self.fxquant_down_scale
    fp8_rowwise_linear_default_1 = torch.ops.fxquant.fp8_rowwise_linear.default(gelu, fxquant_down_weight, fxquant_down_scale, None, None)
    linear_2 = torch._C._nn.linear(fp8_rowwise_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")

    def test_mlp_fp8_blockwise(self):
        code = self.check(MLP(), torch.randn(2, 5, 64), config=BLOCKWISE)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fxquant_up_scale = self.fxquant_up_scale
    fp8_blockwise_linear_default = torch.ops.fxquant.fp8_blockwise_linear.default(l_x_, fxquant_up_weight, fxquant_up_scale, up_bias_, None)
    gelu = torch._C._nn.gelu(fp8_blockwise_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fxquant_down_scale = self.fxquant_down_scale
    fp8_blockwise_linear_default_1 = torch.ops.fxquant.fp8_blockwise_linear.default(gelu, fxquant_down_weight, fxquant_down_scale, None, None)
    linear_2 = torch._C._nn.linear(fp8_blockwise_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")

    def test_mlp_fp8_tensorwise_dynamic(self):
        code = self.check(MLP(), torch.randn(2, 5, 64), config=TENSORWISE)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fxquant_up_scale = self.fxquant_up_scale
    fp8_tensorwise_linear_default = torch.ops.fxquant.fp8_tensorwise_linear.default(l_x_, fxquant_up_weight, fxquant_up_scale, up_bias_, None)
    gelu = torch._C._nn.gelu(fp8_tensorwise_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fxquant_down_scale = self.fxquant_down_scale
    fp8_tensorwise_linear_default_1 = torch.ops.fxquant.fp8_tensorwise_linear.default(gelu, fxquant_down_weight, fxquant_down_scale, None, None)
    linear_2 = torch._C._nn.linear(fp8_tensorwise_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")

    def test_mlp_fp8_tensorwise_static_folds_both_scales(self):
        config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": 4.0, "down": 2.0})
        code = self.check(MLP(), torch.randn(2, 5, 64), config=config)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fp8_tensorwise_static_linear_default = torch.ops.fxquant.fp8_tensorwise_static_linear.default(l_x_, fxquant_up_weight, 2.490834030661359e-06, up_bias_, 0.008928571827709675)
    gelu = torch._C._nn.gelu(fp8_tensorwise_static_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fp8_tensorwise_static_linear_default_1 = torch.ops.fxquant.fp8_tensorwise_static_linear.default(gelu, fxquant_down_weight, 8.806831833046045e-07, None, 0.004464285913854837)
    linear_2 = torch._C._nn.linear(fp8_tensorwise_static_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")

    def test_mlp_int8(self):
        code = self.check(MLP(), torch.randn(2, 5, 64), config=INT8)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fxquant_up_scale = self.fxquant_up_scale
    int8_linear_default = torch.ops.fxquant.int8_linear.default(l_x_, fxquant_up_weight, fxquant_up_scale, up_bias_)
    gelu = torch._C._nn.gelu(int8_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fxquant_down_scale = self.fxquant_down_scale
    int8_linear_default_1 = torch.ops.fxquant.int8_linear.default(gelu, fxquant_down_weight, fxquant_down_scale, None)
    linear_2 = torch._C._nn.linear(int8_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")

    def test_functional_linear_with_and_without_bias(self):
        code = self.check(FunctionalLinear(), torch.randn(3, 64), config=FP8)
        self.assertExpectedInline(code, """\
def forward(self, w1_, b1_, L_x_, w2_):
    fxquant_w1_weight = self.fxquant_w1_weight
    fxquant_w1_scale = self.fxquant_w1_scale
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_w1_weight, fxquant_w1_scale, b1_, None)
    relu = torch.relu(fp8_rowwise_linear_default)
    fxquant_w2_weight = self.fxquant_w2_weight
    fxquant_w2_scale = self.fxquant_w2_scale
    fp8_rowwise_linear_default_1 = torch.ops.fxquant.fp8_rowwise_linear.default(relu, fxquant_w2_weight, fxquant_w2_scale, None, None)
    return (fp8_rowwise_linear_default_1,)""")

    def test_matmul_on_weight_transposed_and_kn(self):
        code = self.check(MatmulOnWeight(), torch.randn(3, 64), config=INT8)
        self.assertExpectedInline(code, """\
def forward(self, w_, L_x_, v_):
    fxquant_w_weight = self.fxquant_w_weight
    fxquant_w_scale = self.fxquant_w_scale
    int8_linear_default = torch.ops.fxquant.int8_linear.default(l_x_, fxquant_w_weight, fxquant_w_scale, None)
    tanh = torch.tanh(int8_linear_default)
    fxquant_v_weight = self.fxquant_v_weight
    fxquant_v_scale = self.fxquant_v_scale
    int8_linear_default_1 = torch.ops.fxquant.int8_linear.default(tanh, fxquant_v_weight, fxquant_v_scale, None)
    return (int8_linear_default_1,)""")

    def test_addmm(self):
        code = self.check(Addmm(), torch.randn(4, 64), config=FP8)
        self.assertExpectedInline(code, """\
def forward(self, bias_, weight_, L_x_):
    fxquant_weight_weight = self.fxquant_weight_weight
    fxquant_weight_scale = self.fxquant_weight_scale
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_weight_weight, fxquant_weight_scale, bias_, None)
    return (fp8_rowwise_linear_default,)""")

    def test_activation_scale_ub_is_passed_to_the_op(self):
        config = QuantConfig(scheme="fp8_rowwise", activation_scale_ub=1200.0, skip=())
        code = self.check(MLP(), torch.randn(2, 5, 64), config=config)
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_weight = self.fxquant_up_weight
    fxquant_up_scale = self.fxquant_up_scale
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_up_weight, fxquant_up_scale, up_bias_, 1200.0)
    gelu = torch._C._nn.gelu(fp8_rowwise_linear_default)
    fxquant_down_weight = self.fxquant_down_weight
    fxquant_down_scale = self.fxquant_down_scale
    fp8_rowwise_linear_default_1 = torch.ops.fxquant.fp8_rowwise_linear.default(gelu, fxquant_down_weight, fxquant_down_scale, None, 1200.0)
    fxquant_lm_head_weight = self.fxquant_lm_head_weight
    fxquant_lm_head_scale = self.fxquant_lm_head_scale
    fp8_rowwise_linear_default_2 = torch.ops.fxquant.fp8_rowwise_linear.default(fp8_rowwise_linear_default_1, fxquant_lm_head_weight, fxquant_lm_head_scale, None, 1200.0)
    return (fp8_rowwise_linear_default_2,)""")

    def llama_decoder_layer(self, config):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        llama = tiny_llama_config()
        llama._attn_implementation = "eager"  # attention as plain matmuls of activations: never rewritten
        layer = LlamaDecoderLayer(llama, layer_idx=0).eval()
        hidden = torch.randn(2, 8, llama.hidden_size)
        position_embeddings = LlamaRotaryEmbedding(llama)(hidden, torch.arange(8).unsqueeze(0))
        return self.check(layer, hidden, config=config, position_embeddings=position_embeddings)

    def test_llama_decoder_layer_fp8_rowwise(self):
        self.assertExpectedInline(self.llama_decoder_layer(FP8), """\
def forward(self, L_args_0_, input_layernorm_weight_, self_attn_q_proj_weight_, self_attn_k_proj_weight_, self_attn_v_proj_weight_, L_kwargs_position_embeddings_0_, L_kwargs_position_embeddings_1_, self_attn_o_proj_weight_, post_attention_layernorm_weight_, mlp_gate_proj_weight_, mlp_up_proj_weight_, mlp_down_proj_weight_):
    hidden_states = l_args_0_.to(torch.float32)
    pow_1 = hidden_states.pow(2)
    variance = pow_1.mean(-1, keepdim = True)
    add = variance + 1e-06
    rsqrt = torch.rsqrt(add)
    hidden_states_1 = hidden_states * rsqrt
    to_1 = hidden_states_1.to(torch.float32)
    hidden_states_2 = input_layernorm_weight_ * to_1
    fxquant_self_attn_q_proj_merged_weight = self.fxquant_self_attn_q_proj_merged_weight
    fxquant_self_attn_q_proj_merged_scale = self.fxquant_self_attn_q_proj_merged_scale
    fp8_rowwise_linear_default_7 = torch.ops.fxquant.fp8_rowwise_linear.default(hidden_states_2, fxquant_self_attn_q_proj_merged_weight, fxquant_self_attn_q_proj_merged_scale, None, None)
    split_with_sizes_default = torch.ops.aten.split_with_sizes.default(fp8_rowwise_linear_default_7, [64, 32, 32], -1)
    getitem_6 = split_with_sizes_default[0]
    getitem_7 = split_with_sizes_default[1]
    getitem_8 = split_with_sizes_default[2]
    view = getitem_6.view((2, 8, -1, 16))
    query_states = view.transpose(1, 2)
    view_1 = getitem_7.view((2, 8, -1, 16))
    key_states = view_1.transpose(1, 2)
    view_2 = getitem_8.view((2, 8, -1, 16))
    value_states = view_2.transpose(1, 2)
    cos = l_kwargs_position_embeddings_0_.unsqueeze(1)
    sin = l_kwargs_position_embeddings_1_.unsqueeze(1)
    mul_2 = query_states * cos
    x1 = query_states[(Ellipsis, slice(None, 8, None))]
    x2 = query_states[(Ellipsis, slice(8, None, None))]
    neg = -x2
    cat = torch.cat((neg, x1), dim = -1)
    mul_3 = cat * sin
    q_embed = mul_2 + mul_3
    mul_4 = key_states * cos
    x1_1 = key_states[(Ellipsis, slice(None, 8, None))]
    x2_1 = key_states[(Ellipsis, slice(8, None, None))]
    neg_1 = -x2_1
    cat_1 = torch.cat((neg_1, x1_1), dim = -1)
    mul_5 = cat_1 * sin
    k_embed = mul_4 + mul_5
    getitem_4 = k_embed[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
    hidden_states_3 = getitem_4.expand(2, 2, 2, 8, 16)
    key_states_1 = hidden_states_3.reshape(2, 4, 8, 16)
    getitem_5 = value_states[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
    hidden_states_4 = getitem_5.expand(2, 2, 2, 8, 16)
    value_states_1 = hidden_states_4.reshape(2, 4, 8, 16)
    transpose_3 = key_states_1.transpose(2, 3)
    matmul = torch.matmul(q_embed, transpose_3)
    attn_weights = matmul * 0.25
    softmax = torch.nn.functional.softmax(attn_weights, dim = -1, dtype = torch.float32)
    attn_weights_1 = softmax.to(torch.float32)
    attn_weights_2 = torch.nn.functional.dropout(attn_weights_1, p = 0.0, training = False)
    attn_output = torch.matmul(attn_weights_2, value_states_1)
    transpose_4 = attn_output.transpose(1, 2)
    attn_output_1 = transpose_4.contiguous()
    reshape_2 = attn_output_1.reshape(2, 8, -1)
    attn_output_2 = reshape_2.contiguous()
    fxquant_self_attn_o_proj_weight = self.fxquant_self_attn_o_proj_weight
    fxquant_self_attn_o_proj_scale = self.fxquant_self_attn_o_proj_scale
    fp8_rowwise_linear_default_3 = torch.ops.fxquant.fp8_rowwise_linear.default(attn_output_2, fxquant_self_attn_o_proj_weight, fxquant_self_attn_o_proj_scale, None, None)
    hidden_states_5 = l_args_0_ + fp8_rowwise_linear_default_3
    hidden_states_6 = hidden_states_5.to(torch.float32)
    pow_2 = hidden_states_6.pow(2)
    variance_1 = pow_2.mean(-1, keepdim = True)
    add_4 = variance_1 + 1e-06
    rsqrt_1 = torch.rsqrt(add_4)
    hidden_states_7 = hidden_states_6 * rsqrt_1
    to_4 = hidden_states_7.to(torch.float32)
    hidden_states_8 = post_attention_layernorm_weight_ * to_4
    fxquant_mlp_gate_proj_merged_weight = self.fxquant_mlp_gate_proj_merged_weight
    fxquant_mlp_gate_proj_merged_scale = self.fxquant_mlp_gate_proj_merged_scale
    fp8_rowwise_linear_default_8 = torch.ops.fxquant.fp8_rowwise_linear.default(hidden_states_8, fxquant_mlp_gate_proj_merged_weight, fxquant_mlp_gate_proj_merged_scale, None, None)
    split_with_sizes_default_1 = torch.ops.aten.split_with_sizes.default(fp8_rowwise_linear_default_8, [128, 128], -1)
    getitem_9 = split_with_sizes_default_1[0]
    getitem_10 = split_with_sizes_default_1[1]
    silu = torch.nn.functional.silu(getitem_9)
    mul_9 = silu * getitem_10
    fxquant_mlp_down_proj_weight = self.fxquant_mlp_down_proj_weight
    fxquant_mlp_down_proj_scale = self.fxquant_mlp_down_proj_scale
    fp8_rowwise_linear_default_6 = torch.ops.fxquant.fp8_rowwise_linear.default(mul_9, fxquant_mlp_down_proj_weight, fxquant_mlp_down_proj_scale, None, None)
    hidden_states_9 = hidden_states_5 + fp8_rowwise_linear_default_6
    return (hidden_states_9,)""")

    def test_llama_decoder_layer_int8(self):
        # The rest of the graph is pinned by the fp8_rowwise test; here only the rewritten lines.
        self.assertExpectedInline(rewritten_lines(self.llama_decoder_layer(INT8)), """\
    fxquant_self_attn_q_proj_merged_weight = self.fxquant_self_attn_q_proj_merged_weight
    fxquant_self_attn_q_proj_merged_scale = self.fxquant_self_attn_q_proj_merged_scale
    int8_linear_default_7 = torch.ops.fxquant.int8_linear.default(hidden_states_2, fxquant_self_attn_q_proj_merged_weight, fxquant_self_attn_q_proj_merged_scale, None)
    fxquant_self_attn_o_proj_weight = self.fxquant_self_attn_o_proj_weight
    fxquant_self_attn_o_proj_scale = self.fxquant_self_attn_o_proj_scale
    int8_linear_default_3 = torch.ops.fxquant.int8_linear.default(attn_output_2, fxquant_self_attn_o_proj_weight, fxquant_self_attn_o_proj_scale, None)
    fxquant_mlp_gate_proj_merged_weight = self.fxquant_mlp_gate_proj_merged_weight
    fxquant_mlp_gate_proj_merged_scale = self.fxquant_mlp_gate_proj_merged_scale
    int8_linear_default_8 = torch.ops.fxquant.int8_linear.default(hidden_states_8, fxquant_mlp_gate_proj_merged_weight, fxquant_mlp_gate_proj_merged_scale, None)
    fxquant_mlp_down_proj_weight = self.fxquant_mlp_down_proj_weight
    fxquant_mlp_down_proj_scale = self.fxquant_mlp_down_proj_scale
    int8_linear_default_6 = torch.ops.fxquant.int8_linear.default(mul_9, fxquant_mlp_down_proj_weight, fxquant_mlp_down_proj_scale, None)""")


    def test_llama_decoder_layer_fp8_blockwise(self):
        # The rest of the graph is pinned by the fp8_rowwise test; here only the rewritten lines.
        self.assertExpectedInline(rewritten_lines(self.llama_decoder_layer(BLOCKWISE)), """\
    fxquant_self_attn_q_proj_merged_weight = self.fxquant_self_attn_q_proj_merged_weight
    fxquant_self_attn_q_proj_merged_scale = self.fxquant_self_attn_q_proj_merged_scale
    fp8_blockwise_linear_default_7 = torch.ops.fxquant.fp8_blockwise_linear.default(hidden_states_2, fxquant_self_attn_q_proj_merged_weight, fxquant_self_attn_q_proj_merged_scale, None, None)
    fxquant_self_attn_o_proj_weight = self.fxquant_self_attn_o_proj_weight
    fxquant_self_attn_o_proj_scale = self.fxquant_self_attn_o_proj_scale
    fp8_blockwise_linear_default_3 = torch.ops.fxquant.fp8_blockwise_linear.default(attn_output_2, fxquant_self_attn_o_proj_weight, fxquant_self_attn_o_proj_scale, None, None)
    fxquant_mlp_gate_proj_merged_weight = self.fxquant_mlp_gate_proj_merged_weight
    fxquant_mlp_gate_proj_merged_scale = self.fxquant_mlp_gate_proj_merged_scale
    fp8_blockwise_linear_default_8 = torch.ops.fxquant.fp8_blockwise_linear.default(hidden_states_8, fxquant_mlp_gate_proj_merged_weight, fxquant_mlp_gate_proj_merged_scale, None, None)
    fxquant_mlp_down_proj_weight = self.fxquant_mlp_down_proj_weight
    fxquant_mlp_down_proj_scale = self.fxquant_mlp_down_proj_scale
    fp8_blockwise_linear_default_6 = torch.ops.fxquant.fp8_blockwise_linear.default(mul_9, fxquant_mlp_down_proj_weight, fxquant_mlp_down_proj_scale, None, None)""")


    def test_llama_decoder_layer_fp8_tensorwise(self):
        # The rest of the graph is pinned by the fp8_rowwise test; here only the rewritten lines.
        self.assertExpectedInline(rewritten_lines(self.llama_decoder_layer(TENSORWISE)), """\
    fxquant_self_attn_q_proj_weight = self.fxquant_self_attn_q_proj_weight
    fxquant_self_attn_q_proj_scale = self.fxquant_self_attn_q_proj_scale
    fp8_tensorwise_linear_default = torch.ops.fxquant.fp8_tensorwise_linear.default(hidden_states_2, fxquant_self_attn_q_proj_weight, fxquant_self_attn_q_proj_scale, None, None)
    fxquant_self_attn_k_proj_weight = self.fxquant_self_attn_k_proj_weight
    fxquant_self_attn_k_proj_scale = self.fxquant_self_attn_k_proj_scale
    fp8_tensorwise_linear_default_1 = torch.ops.fxquant.fp8_tensorwise_linear.default(hidden_states_2, fxquant_self_attn_k_proj_weight, fxquant_self_attn_k_proj_scale, None, None)
    fxquant_self_attn_v_proj_weight = self.fxquant_self_attn_v_proj_weight
    fxquant_self_attn_v_proj_scale = self.fxquant_self_attn_v_proj_scale
    fp8_tensorwise_linear_default_2 = torch.ops.fxquant.fp8_tensorwise_linear.default(hidden_states_2, fxquant_self_attn_v_proj_weight, fxquant_self_attn_v_proj_scale, None, None)
    fxquant_self_attn_o_proj_weight = self.fxquant_self_attn_o_proj_weight
    fxquant_self_attn_o_proj_scale = self.fxquant_self_attn_o_proj_scale
    fp8_tensorwise_linear_default_3 = torch.ops.fxquant.fp8_tensorwise_linear.default(attn_output_2, fxquant_self_attn_o_proj_weight, fxquant_self_attn_o_proj_scale, None, None)
    fxquant_mlp_gate_proj_weight = self.fxquant_mlp_gate_proj_weight
    fxquant_mlp_gate_proj_scale = self.fxquant_mlp_gate_proj_scale
    fp8_tensorwise_linear_default_4 = torch.ops.fxquant.fp8_tensorwise_linear.default(hidden_states_8, fxquant_mlp_gate_proj_weight, fxquant_mlp_gate_proj_scale, None, None)
    fxquant_mlp_up_proj_weight = self.fxquant_mlp_up_proj_weight
    fxquant_mlp_up_proj_scale = self.fxquant_mlp_up_proj_scale
    fp8_tensorwise_linear_default_5 = torch.ops.fxquant.fp8_tensorwise_linear.default(hidden_states_8, fxquant_mlp_up_proj_weight, fxquant_mlp_up_proj_scale, None, None)
    fxquant_mlp_down_proj_weight = self.fxquant_mlp_down_proj_weight
    fxquant_mlp_down_proj_scale = self.fxquant_mlp_down_proj_scale
    fp8_tensorwise_linear_default_6 = torch.ops.fxquant.fp8_tensorwise_linear.default(mul_9, fxquant_mlp_down_proj_weight, fxquant_mlp_down_proj_scale, None, None)""")

