"""Build of the optional oneDNN convolution extension (ntksap_jax/_onednn_conv*.so).

Everything else about the package is declared in pyproject.toml. The extension is a plain shared
library of XLA FFI handlers (csrc/onednn_conv.cc), loaded with ctypes by ntksap_jax/_onednn.py;
it needs a C++17 compiler, oneDNN 2.x headers and library (Debian/Ubuntu: `apt-get install
libdnnl-dev`; elsewhere set ONEDNN_ROOT to a prefix with include/oneapi/dnnl/dnnl.hpp and lib/)
and XLA's FFI headers, which jaxlib ships (a build requirement in pyproject.toml). When any of
them is missing the build says why and the package installs without it: convolutions then run on
XLA's own CPU path, and the library says so once at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _onednn_prefix() -> Path | None:
    candidates = [os.environ.get("ONEDNN_ROOT", ""), "/usr", "/usr/local", os.environ.get("CONDA_PREFIX", "")]
    for prefix in filter(None, candidates):
        if (Path(prefix) / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists():
            return Path(prefix)
    return None


def _ffi_include() -> Path | None:
    try:
        import jaxlib
    except ImportError:
        return None
    path = Path(jaxlib.__file__).parent / "include"
    return path if (path / "xla" / "ffi" / "api" / "ffi.h").exists() else None


class OptionalBuildExt(build_ext):
    """Builds the extension when its headers are there; never fails the install.

    A skipped or failed extension is taken off ``self.extensions``, so the wheel (editable or not)
    does not look for its file. ``NTKSAP_JAX_BUILD_ONEDNN=0`` skips it on purpose.
    """

    def run(self):
        prefix, ffi = _onednn_prefix(), _ffi_include()
        if os.environ.get("NTKSAP_JAX_BUILD_ONEDNN", "1") == "0":
            missing = "NTKSAP_JAX_BUILD_ONEDNN=0"
        elif prefix is None:
            missing = "no oneDNN headers: apt-get install libdnnl-dev, or set ONEDNN_ROOT"
        elif ffi is None:
            missing = "no jaxlib with XLA's FFI headers in the build environment"
        else:
            missing = None
        if missing:
            print(f"ntksap-jax: not building the oneDNN convolutions ({missing}); XLA's CPU path is used")
            self.extensions = []
            return
        for ext in self.extensions:
            ext.include_dirs += [str(prefix / "include"), str(ffi)]
            ext.library_dirs += [str(prefix / "lib"), str(prefix / "lib" / "x86_64-linux-gnu")]
            if str(prefix) not in ("/usr", "/usr/local"):
                ext.runtime_library_dirs += [str(prefix / "lib")]
        self._failed = []
        super().run()
        self.extensions = [ext for ext in self.extensions if ext not in self._failed]

    def copy_extensions_to_source(self):  # the in-place copy of an editable install: built ones only
        self.extensions = [ext for ext in self.extensions if ext not in getattr(self, "_failed", [])]
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - an optional extension must never fail the install
            print(f"ntksap-jax: the oneDNN convolutions did not build ({err}); XLA's CPU path is used")
            self._failed.append(ext)


setup(
    ext_modules=[
        Extension(
            "ntksap_jax._onednn_conv",
            sources=["csrc/onednn_conv.cc"],
            libraries=["dnnl"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-fopenmp", "-w"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
