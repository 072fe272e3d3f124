#!/usr/bin/env bash
# Build grouter with its CUDA backend where torch is a CUDA wheel but no CUDA toolkit is
# installed (no nvcc, no /usr/local/cuda): nvcc, the CUDA headers and CCCL (CUB) come from
# NVIDIA's PyPI packages of the same CUDA version as torch, and the build is pointed at them.
#
#   PYTHON=.venv/bin/python bash tools/build_cuda_from_wheels.sh [pip install arguments, default: -e .]
#
# Needs the packages' index (PyPI) once; TORCH_CUDA_ARCH_LIST as for any build (default 8.0;9.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
cuda=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -z "$cuda" ]; then
  echo "build_cuda_from_wheels: torch $("$PY" -c 'import torch; print(torch.__version__)') has no CUDA" >&2
  exit 2
fi
series=$(echo "$cuda" | cut -d. -f1,2)  # 13.0: the compiler, headers and runtime of torch's CUDA
"$PY" -m pip install -q "nvidia-cuda-nvcc==$series.*" "nvidia-cuda-crt==$series.*" "nvidia-nvvm==$series.*" \
  "nvidia-cuda-cccl==$series.*" "nvidia-cuda-runtime==$series.*"
home=$("$PY" - "$series" <<'PY'
import importlib.util, pathlib, sys
major = sys.argv[1].split(".")[0]
root = pathlib.Path(importlib.util.find_spec("nvidia").submodule_search_locations[0])
home = root / f"cu{major}"  # CUDA 13 packages share one tree: bin/, include/ (+ include/cccl), lib/
if not (home / "bin" / "nvcc").is_file():
    sys.exit(f"build_cuda_from_wheels: no nvcc under {home}")
print(home)
PY
)
lib="$home/lib"
# The packages ship versioned runtime libraries only (libcudart.so.13); CMake's CUDA toolkit
# lookup wants the unversioned name.
[ -e "$lib/libcudart.so" ] || ln -s "$(basename "$(ls "$lib"/libcudart.so.* | head -1)")" "$lib/libcudart.so"
echo "build_cuda_from_wheels: torch CUDA $cuda, toolkit from wheels at $home"
export CUDA_HOME="$home" PATH="$home/bin:$PATH" GROUTER_CUDA=1
export CPATH="$home/include/cccl:$home/include${CPATH:+:$CPATH}"
# nvcc's profile looks for its link libraries (cudadevrt, cudart_static) in lib64/, which the
# packages do not have: the linker's search path names lib/.
export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
"$PY" -m pip install --no-build-isolation "${@:--e .}"
