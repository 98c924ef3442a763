#!/usr/bin/env bash
# One stage of the GPU checks per device call (each call is limited to 10 minutes), results under
# $OUT (they come back) and a short summary on stdout; FXQUANT_TIMEOUT (seconds, default 560) bounds
# a stage, to fit two in one call. Run from the repository root on the device:
#
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh tests [PATHS]  # gpu-marked tests (all: three processes at once)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm        # GEMM table, all schemes
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-decode # fp8_rowwise GEMM choices at M = 1, 16 (split-K included)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh gemm-prefill # fp8_rowwise at M = 1024, 4096, 16384 (fused_q+gemm vs FBGEMM's GEMM)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh e2e         # forward table, bf16 vs fxquant
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh decode      # static-cache generate loop
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh torchao [SHAPES]  # bf16, fxquant, torchao in one run (1x1 16x1; then 1x2048 4x2048)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh profile     # top kernels of decode-shaped forwards
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh profile-prefill  # the same for (1, 2048) and (4, 2048)
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh reductions [split no-split persistent]  # decode kernels and
#                                                  # default-mode forwards with Inductor's row reductions split or not
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh merge       # fxquant with and without the merge pass
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh blockwise   # fp8_blockwise in the Llama forward
#     source .whl/ondevice.sh && bash benchmarks/on_device.sh aoti-probe  # which step of a plain AOTInductor package dies
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
quiet() { grep -v -E "Warning|warn\(|^  |AUTOTUNE|strides:|dtypes:|SingleProcess|_fbgemm_torch_compat|cannot determine|^\s*$|\[0m|\[33m"; }

case "${1:?stage: tests | gemm | gemm-decode | gemm-prefill | e2e | decode | torchao | profile | profile-prefill | reductions | merge | blockwise | aoti-probe}" in
  tests)
    # Without PATHS: every gpu test, in three pytest processes at once (compiling dominates and the
    # device has 16 cores; one process took more than the 10 minutes), each to its own file.
    shift
    if [ $# -gt 0 ]; then groups=("$*"); else groups=(
      "tests/kernels/test_cuda_fp8_rowwise_gemm.py"
      "tests/kernels/test_cuda_ops.py tests/kernels/test_fp8_rowwise_splitk.py tests/kernels/test_interpreted_triton_kernels.py"
      "tests/kernels/test_cuda_decode.py tests/kernels/test_cuda_export.py tests/kernels/test_cuda_fp8_schemes.py tests/inductor"); fi
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
  profile)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/profile_decode.py --layers 8 --json "$OUT/profile.json" >"$OUT/profile.txt" 2>&1
    grep -E "^==|^  " "$OUT/profile.txt" | cut -c1-150 ;;
  profile-prefill)
    timeout "${FXQUANT_TIMEOUT:-560}" python3 benchmarks/profile_decode.py --layers 8 --batches 1 4 --tokens 2048 \
      --json "$OUT/profile_prefill.json" >"$OUT/profile_prefill.txt" 2>&1
    grep -E "^==|^  " "$OUT/profile_prefill.txt" | cut -c1-150 ;;
  reductions)
    # SiLU·mul's quantization at decode: Inductor splits its 14336-wide row amax into three kernels.
    # One kernel (no split) was slower on the GPU (7.0 vs 5.8 µs per layer) but launches fewer;
    # multi-kernel also tries a persistent (whole row in registers) one. Per variant: fxquant's
    # kernels, and bf16 vs fxquant in default mode, where decode is host-bound (bf16's SiLU·mul has
    # no reduction to split; its RMSNorm rows, 4096 wide, are never split).
    # Each variant takes ~4 minutes: name one or two per call (default: split no-split).
    shift; [ $# -gt 0 ] || set -- split no-split
    declare -A settings=([split]="" [no-split]="TORCHINDUCTOR_SPLIT_REDUCTIONS=0"
                         [persistent]="TORCHINDUCTOR_SPLIT_REDUCTIONS=0 TORCHINDUCTOR_MULTI_KERNEL=1")
    for name in "$@"; do
      variant="$name:${settings[$name]}"; mkdir -p "$OUT/$name"
      # shellcheck disable=SC2086  (the variant's settings are words for env)
      env ${variant#*:} timeout 120 python3 benchmarks/profile_decode.py --layers 8 --peers fxquant \
        --json "$OUT/$name/profile.json" >"$OUT/$name/profile.txt" 2>&1
      # shellcheck disable=SC2086
      env ${variant#*:} timeout 150 python3 benchmarks/e2e_llama.py --layers 8 --modes default --peers bf16 fxquant \
        --shapes 1x1 16x1 --no-recompile-check --repeats 20 --json "$OUT/$name/e2e_default.json" >"$OUT/$name/e2e.txt" 2>&1
      echo "#### $name"; grep -E "^==|^  [A-Z]|mul_silu" "$OUT/$name/profile.txt" | cut -c1-150
      grep -E "^(mode|default) " "$OUT/$name/e2e.txt"
    done ;;
  aoti-probe)
    { timeout 270 python3 benchmarks/aoti_probe.py; timeout 270 env -u PYTHONPATH python3 benchmarks/aoti_probe.py --no-carried; } \
      >"$OUT/aoti_probe.txt" 2>&1
    grep -v -E "^\s*$" "$OUT/aoti_probe.txt" | tail -60 ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
