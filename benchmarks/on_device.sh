#!/usr/bin/env bash
# One stage of the GPU checks per device call (each call is limited to 10 minutes), results under
# $OUT (they come back) and a short summary on stdout; FXQUANT_TIMEOUT (seconds, default 560) bounds
# a stage, to fit two in one call. Run from the repository root on the device:
#
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh tests [PATHS]  # gpu-marked tests (all: four processes at once)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm        # GEMM table, all schemes
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-decode # fp8_rowwise GEMM choices at M = 1, 16 (split-K included)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-prefill # fp8_rowwise at M = 1024, 4096, 16384 (fused_q+gemm vs FBGEMM's GEMM)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh e2e         # forward table, bf16 vs fxquant
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh decode      # static-cache generate loop
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh torchao [SHAPES]  # bf16, fxquant, torchao in one run (1x1 16x1; then 1x2048 4x2048)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh profile     # top kernels of decode-shaped forwards
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh profile-prefill [PEERS]  # the same for (1, 2048) and (4, 2048)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh settings [PEERS]  # fxquant's Inductor settings vs Inductor's,
#                                                  # decode-shaped: kernels per forward, default and CUDA-graph ms
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh default-decode  # bf16 vs fxquant without CUDA graphs, both orders
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh merge       # fxquant with and without the merge pass
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh blockwise   # fp8_blockwise in the Llama forward
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh nf4 [PEERS] # decode 1x1 16x1: bf16, nf4, bitsandbytes' nf4, torchao int4
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-4bit   # nf4 linear_4bit op vs bf16 per shape, M = 1, 16
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh probe-4bit-lut [LAYERS]  # the 2-16-row nf4 kernel's lookup:
#                                                  # tl.gather vs PTX prmt, absmax after the MMA (benchmarks/probe_4bit_lut.py)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh int8        # int8 (and with weights frozen) in the Llama forward (1x1 16x1 1x2048 4x2048),
#                                                  # then fp8_rowwise at serving batch sizes (32..256, 1)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-serving # fp8_rowwise GEMM choices at M = 32..512
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-int8   # int8 GEMM choices per shape (after an RMSNorm)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh serving-settings  # fp8_rowwise at (32..256, 1): decode's
#                                                  # Inductor settings (realize_opcount_threshold=100) against the default
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh aoti-probe  # which step of a plain AOTInductor package dies
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh weight-check  # check_weight_updates' cost per decode step
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh moe [PARTS]  # MoE: expert GEMM kernel table, Qwen3-30B-A3B-
#                                                  # and Mixtral-8x7B-shaped models, bf16 vs fxquant (PARTS: kernels configs qwen3 mixtral batched)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh profile-moe [SHAPE [PEERS]]  # Qwen3-shaped MoE forward's kernels
#                                                  # (SHAPE 4x2048 by default, or 1x1, 16x1...), e.g. PEERS with Inductor settings
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh tp [LAYERS]  # two GPUs (nvidia-h200-x2): the TP test, bf16 TP vs fxquant TP
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
quiet() { grep -v -E "Warning|warn\(|^  |AUTOTUNE|strides:|dtypes:|SingleProcess|_fbgemm_torch_compat|cannot determine|^\s*$|\[0m|\[33m"; }

case "${1:?stage: tests | gemm | gemm-decode | gemm-prefill | e2e | decode | torchao | profile | profile-prefill | settings | default-decode | merge | blockwise | nf4 | gemm-4bit | probe-4bit-lut | int8 | gemm-serving | gemm-int8 | serving-settings | aoti-probe | weight-check | moe | profile-moe | tp}" in
  tests)
    # Without PATHS: every gpu test, in six pytest processes at once (compiling dominates and the
    # device has 16 cores; one process took more than the 10 minutes, and test_cuda_export.py beside
    # test_cuda_fp8_rowwise_gemm.py more than 480 s), each to its own file.
    shift
    if [ $# -gt 0 ]; then groups=("$*"); else groups=(
      "tests/kernels/test_cuda_fp8_rowwise_gemm.py"
      "tests/kernels/test_cuda_export.py"
      "tests/kernels/test_cuda_ops.py tests/kernels/test_cuda_cached_graph.py tests/kernels/test_fp8_rowwise_splitk.py tests/kernels/test_interpreted_triton_kernels.py"
      "tests/kernels/test_cuda_decode.py tests/kernels/test_cuda_fp8_schemes.py tests/inductor"
      "tests/kernels/test_cuda_compiled_quantization.py tests/kernels/test_cuda_op_branches.py tests/kernels/test_cuda_trust.py tests/kernels/test_cuda_quantize_inplace.py tests/kernels/test_cuda_int8.py tests/kernels/test_cuda_bnb.py tests/kernels/test_interpreted_gemm_4bit.py"
      "tests/kernels/test_cuda_experts.py tests/kernels/test_cuda_blockwise_experts.py tests/kernels/test_cuda_tensor_parallel.py"); fi
    for i in "${!groups[@]}"; do
      # shellcheck disable=SC2086  (a group is a space-separated list of paths)
      timeout "${FXQUANT_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider --tb=short -rsfE --durations=10 \
        ${groups[$i]} >"$OUT/tests_$i.txt" 2>&1 &
    done
    wait
    for i in "${!groups[@]}"; do
      echo "== ${groups[$i]}"; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/tests_$i.txt" | tail -20
    done ;;
  gemm)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/gemm.py --m 1 16 128 1024 4096 16384 --json "$OUT/gemm.json" >"$OUT/gemm.txt" 2>&1
    quiet <"$OUT/gemm.txt" | tail -30 ;;
  gemm-decode)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/gemm.py --rowwise-only --m 1 16 --json "$OUT/gemm_decode.json" >"$OUT/gemm_decode.txt" 2>&1
    quiet <"$OUT/gemm_decode.txt" | tail -12 ;;
  gemm-prefill)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/gemm.py --rowwise-only --m 1024 4096 16384 --json "$OUT/gemm_prefill.json" >"$OUT/gemm_prefill.txt" 2>&1
    quiet <"$OUT/gemm_prefill.txt" | tail -14 ;;
  e2e)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes default reduce-overhead --peers bf16 fxquant --profile \
      --repeats 10 --json "$OUT/e2e.json" >"$OUT/e2e.txt" 2>&1
    quiet <"$OUT/e2e.txt" | tail -8 ;;
  decode)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant --decode \
      --json "$OUT/decode.json" >"$OUT/decode.txt" 2>&1
    quiet <"$OUT/decode.txt" | tail -8 ;;
  torchao)
    shift; shapes=("${@}"); [ ${#shapes[@]} -gt 0 ] || shapes=(1x1 16x1)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant torchao \
      --shapes "${shapes[@]}" --no-recompile-check --repeats 10 --json "$OUT/e2e_torchao.json" >"$OUT/e2e_torchao.txt" 2>&1
    quiet <"$OUT/e2e_torchao.txt" | tail -8 ;;
  merge)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant fxquant-per-layer \
      --repeats 10 --json "$OUT/e2e_merge.json" >"$OUT/e2e_merge.txt" 2>&1
    quiet <"$OUT/e2e_merge.txt" | tail -8 ;;
  blockwise)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant-blockwise \
      --repeats 10 --json "$OUT/e2e_blockwise.json" >"$OUT/e2e_blockwise.txt" 2>&1
    quiet <"$OUT/e2e_blockwise.txt" | tail -8 ;;
  nf4)
    # torchao's int4 last: its compile is the slow one, and each peer's JSON line is printed as it ends
    shift; peers=("${@}"); [ ${#peers[@]} -gt 0 ] || peers=(bf16 fxquant-nf4 bnb-nf4 torchao-int4)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers "${peers[@]}" \
      --shapes 1x1 16x1 --no-recompile-check --repeats 10 --json "$OUT/e2e_nf4.json" >"$OUT/e2e_nf4.txt" 2>&1
    quiet <"$OUT/e2e_nf4.txt" | tail -8 ;;
  int8)
    timeout 330 python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant-int8 fxquant-int8-frozen \
      --no-recompile-check --repeats 10 --json "$OUT/e2e_int8.json" >"$OUT/e2e_int8.txt" 2>&1
    quiet <"$OUT/e2e_int8.txt" | tail -6
    timeout 230 python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant \
      --shapes 32x1 64x1 128x1 256x1 --no-recompile-check --repeats 10 --json "$OUT/e2e_serving.json" >"$OUT/e2e_serving.txt" 2>&1
    quiet <"$OUT/e2e_serving.txt" | tail -6 ;;
  gemm-4bit)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 -m benchmarks.gemm_4bit --json "$OUT/gemm_4bit.json" 2>&1 | quiet | tail -10 ;;
  gemm-int8)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 -m benchmarks.int8_gemm --m 1 16 128 2048 --json "$OUT/gemm_int8.json" >"$OUT/gemm_int8.txt" 2>&1
    quiet <"$OUT/gemm_int8.txt" | tail -20 ;;
  serving-settings)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead \
      --peers bf16 fxquant fxquant:realize_opcount_threshold=100 --shapes 32x1 64x1 128x1 256x1 --no-recompile-check \
      --repeats 10 --json "$OUT/e2e_serving_settings.json" >"$OUT/e2e_serving_settings.txt" 2>&1
    quiet <"$OUT/e2e_serving_settings.txt" | tail -6 ;;
  gemm-serving)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/gemm.py --rowwise-only --m 32 64 128 256 512 --json "$OUT/gemm_serving.json" >"$OUT/gemm_serving.txt" 2>&1
    quiet <"$OUT/gemm_serving.txt" | tail -14 ;;
  profile)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/profile_decode.py --layers 8 --json "$OUT/profile.json" >"$OUT/profile.txt" 2>&1
    grep -E "^==|^  " "$OUT/profile.txt" | cut -c1-150 ;;
  profile-prefill)
    # PEERS (default bf16 fxquant): e.g. bf16 fxquant fxquant:inductor_choices_class=WholeRowReductions
    shift; [ $# -gt 0 ] || set -- bf16 fxquant
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/profile_decode.py --layers 8 --batches 1 4 --tokens 2048 \
      --peers "$@" --json "$OUT/profile_prefill.json" >"$OUT/profile_prefill.txt" 2>&1
    grep -E "^==|^  " "$OUT/profile_prefill.txt" | cut -c1-150 ;;
  settings)
    # fxquant's Inductor settings (fxquant/inductor/settings.py) against single changes back to
    # Inductor's own, decode-shaped, next to bf16: kernels launched and GPU time per forward
    # (profile, default mode), default-mode ms (host-bound), and CUDA-graph ms (where
    # split_reductions stays on). PEERS: fxquant peers with settings (e2e_llama.peer_model).
    shift; [ $# -gt 0 ] || set -- fxquant fxquant:split_reductions=True fxquant:realize_opcount_threshold=30
    timeout 200 python3 benchmarks/profile_decode.py --layers 8 --peers bf16 "$@" --json "$OUT/settings_profile.json" \
      >"$OUT/settings_profile.txt" 2>&1
    grep -E "^==|^  [A-Z]" "$OUT/settings_profile.txt" | cut -c1-160
    for mode in default reduce-overhead; do
      timeout 170 python3 benchmarks/e2e_llama.py --layers 8 --modes $mode --peers bf16 "$@" --shapes 1x1 16x1 \
        --no-recompile-check --repeats 20 --json "$OUT/settings_$mode.json" >"$OUT/settings_$mode.txt" 2>&1
      grep -E "^(mode|back|$mode) " "$OUT/settings_$mode.txt"
    done ;;
  default-decode)
    # Default mode (no CUDA graphs) at decode shapes: host-bound, and the shared host is noisy, so
    # the two peers run twice in one call, in both orders.
    for order in "bf16 fxquant" "fxquant bf16"; do
      # shellcheck disable=SC2086  (the order is two peer names)
      timeout 150 python3 benchmarks/e2e_llama.py --layers 8 --modes default --peers $order --shapes 1x1 16x1 \
        --no-recompile-check --repeats 50 --json "$OUT/default_decode_${order// /_}.json" >"$OUT/default_decode_${order// /_}.txt" 2>&1
      grep -E "^(mode|back|default) " "$OUT/default_decode_${order// /_}.txt"
    done ;;
  weight-check)
    # What check_weight_updates costs per decode step (fxquant/weight_updates.py), on and off, same run.
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/weight_check.py --layers 8 --out "$OUT" >"$OUT/weight_check.txt" 2>&1
    quiet <"$OUT/weight_check.txt" | tail -14 ;;
  tp)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider --tb=short -rsfE tests/kernels/test_cuda_tensor_parallel.py \
      >"$OUT/tests_tp.txt" 2>&1; grep -E "passed|failed|FAILED|SKIPPED|Error" "$OUT/tests_tp.txt" | tail -5
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/tensor_parallel.py --ranks 2 --layers "${2:-8}" --modes reduce-overhead \
      --json "$OUT/tp.json" >"$OUT/tp.txt" 2>&1
    quiet <"$OUT/tp.txt" | tail -8 ;;
  moe)
    # MoE (benchmarks/moe.py), one part per run, each under its own limit so that a slow one keeps the
    # others' figures. PARTS (default: kernels qwen3, about 5 minutes): kernels (expert GEMM table),
    # configs (the Triton grouped kernel's candidate tiles), qwen3 (4 layers; grouped_mm at decode and
    # prefill), mixtral (2 layers), batched (qwen3's decode shapes with transformers' batched_mm
    # experts). FXQUANT_MOE_PEERS="bf16 fxquant fxquant-frozen" sets the model parts' peers.
    shift; [ $# -gt 0 ] || set -- kernels qwen3
    for part in "$@"; do
      case "$part" in
        batched) args=(--parts qwen3 --decode-implementations batched_mm --shapes 1x1 16x1) ;;
        *) args=(--parts "$part") ;;
      esac
      # shellcheck disable=SC2206  (FXQUANT_MOE_PEERS is a space-separated list of peer names)
      [ -z "${FXQUANT_MOE_PEERS:-}" ] || args+=(--peers ${FXQUANT_MOE_PEERS})
      # shellcheck disable=SC2206  (FXQUANT_MOE_ARGS: more of moe.py's arguments, e.g. "--gemms qwen3.down --tokens 8192")
      [ -z "${FXQUANT_MOE_ARGS:-}" ] || args+=(${FXQUANT_MOE_ARGS})
      timeout "${FXQUANT_MOE_TIMEOUT:-280}" python3 benchmarks/moe.py "${args[@]}" --json "$OUT/moe_$part.json" \
        >"$OUT/moe_$part.txt" 2>&1
      grep -v -E "^\{" "$OUT/moe_$part.txt" | quiet | tail -32
    done ;;
  profile-moe)
    # The Qwen3-30B-A3B-shaped model (4 layers) by kernel, default mode; SHAPE BATCHxTOKENS (4x2048),
    # PEERS (bf16 fxquant-frozen), an fxquant peer with Inductor settings after a colon
    # (fxquant-frozen:split_reductions=True).
    shift; shape=${1:-4x2048}; [ $# -eq 0 ] || shift; [ $# -gt 0 ] || set -- bf16 fxquant-frozen
    (cd benchmarks && timeout "${FXQUANT_TIMEOUT:-560}" python3 profile_decode.py --model qwen3 --layers 4 \
      --batches "${shape%x*}" --tokens "${shape#*x}" --peers "$@" --json "$OUT/profile_moe_$shape.json") \
      >"$OUT/profile_moe_$shape.txt" 2>&1
    grep -E "^==|^  " "$OUT/profile_moe_$shape.txt" | cut -c1-150 ;;
  probe-4bit-lut)
    shift; [ $# -gt 0 ] || set -- gate_up down qkv o
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/probe_4bit_lut.py --layers "$@" >"$OUT/probe_4bit_lut.txt" 2>&1
    grep -E "^==|^  " "$OUT/probe_4bit_lut.txt" | cut -c1-200 ;;
  aoti-probe)
    { timeout 270 python3 benchmarks/aoti_probe.py; timeout 270 env -u PYTHONPATH python3 benchmarks/aoti_probe.py --no-carried; } \
      >"$OUT/aoti_probe.txt" 2>&1
    grep -v -E "^\s*$" "$OUT/aoti_probe.txt" | tail -60 ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
