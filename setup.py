"""Build script of mamlpp_ext: the CPU kernels always, the CUDA kernels whenever nvcc and a CUDA
build of torch are present (a visible GPU is not needed to compile them).

Environment variables read:
  MAMLPP_NO_CUDA=1        build the CPU kernels only
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default: the visible GPUs', or
                          "8.0;9.0" when none is visible)
  CUDA_HOME / CUDA_PATH   CUDA toolkit root (default: found from nvcc on PATH, following wrapper
                          scripts to the real toolkit)
  MAX_JOBS                parallel compile jobs (ninja)
  MAMLPP_DEBUG=1          compile with -O0 -g
On Linux the extension is linked against the libstdc++ that the building Python process (with
torch imported) has loaded, named by path: a compiler whose driver links libstdc++ statically
(seen on a GPU machine's /opt/gcc) would otherwise embed a second copy of the C++ runtime, whose
locale state is not the process's, and the first integer formatted into an error message
segfaulted there.
Build with `pip install --no-build-isolation .` (torch must already be installed).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def log(msg: str) -> None:
    print(f"[mamlpp_ext build] {msg}", flush=True)


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the toolkit of the nvcc on PATH.

    nvcc on PATH may be a small wrapper script (for example `exec /usr/local/cuda-13.0/bin/nvcc`);
    torch's build helper would then take the wrapper's parent folder for the toolkit. We follow
    symlinks and absolute paths named in a wrapper script to the real toolkit instead.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates: list[str] = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return c
    return None


def nvidia_wheel_include_dirs() -> list[str]:
    """Include folders of the pip `nvidia-*` packages that torch's CUDA build installs.

    torch's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers; a minimal system toolkit may
    lack them, while the pip packages carry them (site-packages/nvidia/cu13/include for CUDA 13,
    site-packages/nvidia/<lib>/include for CUDA 12).
    """
    dirs: list[str] = []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        import torch

        roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    except ImportError:
        pass
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


def cuda_build_plan() -> tuple[bool, str]:
    """(build CUDA?, reason), setting CUDA_HOME and TORCH_CUDA_ARCH_LIST when needed."""
    if os.environ.get("MAMLPP_NO_CUDA", "0") not in ("", "0"):
        return False, "MAMLPP_NO_CUDA is set"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return True, f"toolkit {cuda_home}, torch CUDA {torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def runtime_libstdcxx() -> list[str]:
    """Link arguments naming the libstdc++ this process runs with (torch imported), or [].

    Given as a plain input file, the shared library resolves every C++ runtime symbol before
    the compiler driver's own ``-lstdc++`` (static in some toolchains) is searched, so no part
    of the runtime is copied into the extension.
    """
    try:
        import torch  # noqa: F401  (loads the C++ runtime the extension will run with)

        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:
        pass
    return []


def extensions():
    with_cuda, reason = cuda_build_plan()
    import torch.utils.cpp_extension as cpp_ext
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if with_cuda:
        # In case torch.utils.cpp_extension was imported before CUDA_HOME was set.
        cpp_ext.CUDA_HOME = os.environ["CUDA_HOME"]

    debug = os.environ.get("MAMLPP_DEBUG", "0") not in ("", "0")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = (sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("csrc/autograd/*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # -fopenmp at compile time only: at::parallel_for (a header) then really runs on torch's OpenMP
    # threads (without it the header's `#pragma omp parallel` is ignored and every CPU kernel runs
    # on one thread). No -lgomp at link time: the OpenMP symbols resolve to the runtime libtorch_cpu
    # already loads, so the process keeps one thread pool (NOTE [CPU parallel pass], lslr_cpu.cpp).
    cxx_flags = opt + ["-fvisibility=hidden"] + (["-fopenmp"] if os.name == "posix" else [])
    link_args = runtime_libstdcxx()
    log(f"C++ runtime linked by path: {link_args[0] if link_args else 'not found (the driver decides)'}")
    if with_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        toolkit_inc = os.path.join(os.environ["CUDA_HOME"], "include")
        if not os.path.isfile(os.path.join(toolkit_inc, "cusparse.h")):
            extra = nvidia_wheel_include_dirs()
            log(f"toolkit lacks cusparse.h; adding pip nvidia include folders: {extra or 'none found'}")
            # After the toolkit's own folder, so its headers win where both have one.
            include_dirs += extra
        log(f"building CPU + CUDA kernels ({reason})")
        return [CUDAExtension(
            name="mamlpp_ext._C",
            sources=sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("MAMLPP_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": opt + ["--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=link_args,
        )]
    log(f"building CPU kernels only ({reason})")
    return [CppExtension(
        name="mamlpp_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )]


def main():
    ext = extensions()  # first: it sets CUDA_HOME before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension

    if "MAX_JOBS" in os.environ:
        log(f"MAX_JOBS={os.environ['MAX_JOBS']}")
    setup(
        ext_modules=ext,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
