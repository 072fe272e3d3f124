"""Builds grouter's compiled core (grouter/_C) with CMake + Ninja against the installed torch.

Install with `pip install --no-build-isolation [-e] .` so the extension links the torch that is
already in the environment. Environment knobs:
  GROUTER_CUDA=0/1        force the CUDA backend off/on (default: on where torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST    GPU architectures of the CUDA backend (default "8.0;9.0")
  GROUTER_BUILD_TYPE      CMake build type (default Release)
  MAX_JOBS                parallel compile jobs (default: number of CPUs)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _want_cuda(torch) -> str:
    """ON/OFF for the CUDA backend: forced by GROUTER_CUDA, else on where torch and nvcc both have CUDA."""
    forced = os.environ.get("GROUTER_CUDA")
    if forced is not None:
        return "ON" if forced.strip().lower() in ("1", "on", "true", "yes") else "OFF"
    return "ON" if torch.version.cuda and shutil.which("nvcc") else "OFF"


def _cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else where nvcc really lives (it may be a wrapper)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for candidate in ("/usr/local/cuda",):
        if Path(candidate, "bin", "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _tool(name: str) -> str:
    """A build tool from this interpreter's environment (pip's cmake/ninja) before the PATH's."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cuda = _want_cuda(torch)
        # A fixed folder per Python and torch build (not pip's temporary one), so rebuilds of an
        # editable install are incremental and environments with other torch builds do not mix.
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        build_dir = ROOT / "build" / f"cmake-{py}-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("GROUTER_BUILD_TYPE", "Release")
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
        ]
        args.append(f"-DGROUTER_CUDA={cuda}")
        if cuda == "ON":
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            home = _cuda_home()
            if home:  # torch's CMake (FindCUDA) and ours must agree on one toolkit
                args += [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCUDAToolkit_ROOT={home}",
                         f"-DCMAKE_CUDA_COMPILER={home}/bin/nvcc"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cmake = _tool("cmake")
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("grouter._C")],
    cmdclass={"build_ext": CMakeBuild},
)
