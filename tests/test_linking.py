"""libpybn from C and C++ without Python in the loop: the installed header compiles as strict C99
and as C++, the CMake package and pkg-config file of the installed wheel build and run the
examples, and a plain `cmake --install` is relocatable."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import pybn

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None,
                                reason="needs cmake and a C compiler")


def sh(cmd, **kw):
    run = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.mark.parametrize("compiler,flags", [
    ("cc", ["-x", "c", "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror"]),
    ("c++", ["-x", "c++", "-std=c++11", "-pedantic", "-Wall", "-Wextra", "-Werror"]),
])
def test_header_compiles_strictly_without_cuda_headers(tmp_path, compiler, flags):
    src = tmp_path / "use.c"
    src.write_text("#include <pybn/pybn.h>\nint main(void) { return pybn_abi_version() == PYBN_ABI_VERSION ? 0 : 1; }\n")
    sh([compiler, *flags, "-fsyntax-only", f"-I{pybn.get_include()}", str(src)])
    header = (pathlib.Path(pybn.get_include()) / "pybn" / "pybn.h").read_text()
    assert "#include <cuda" not in header


def build_examples(tmp_path, pybn_dir):
    build = tmp_path / "build"
    sh(["cmake", "-S", str(EXAMPLES), "-B", str(build), f"-Dpybn_DIR={pybn_dir}"])
    sh(["cmake", "--build", str(build)])
    out = sh(["ctest", "--output-on-failure"], cwd=build)
    assert "100% tests passed" in out
    for exe in ("train_step_c", "train_step_v1_c", "train_step_cpp"):
        assert sh([str(build / exe)]).strip().endswith("OK")


def test_cmake_package_of_the_wheel_builds_and_runs_the_examples(tmp_path):
    cmake_dir = pathlib.Path(pybn.get_cmake_dir())
    assert (cmake_dir / "pybnConfig.cmake").is_file() and (cmake_dir / "pybnConfigVersion.cmake").is_file()
    build_examples(tmp_path, cmake_dir)


def test_python_m_pybn_flags_compile_the_c_example(tmp_path):
    flags = sh([sys.executable, "-m", "pybn", "--includes", "--libs"]).split()
    assert sh([sys.executable, "-m", "pybn", "--cmake-dir"]).strip() == pybn.get_cmake_dir()
    exe = tmp_path / "train_step"
    sh(["cc", "-std=c99", str(EXAMPLES / "c" / "train_step.c"), *flags, "-lm", "-o", str(exe)])
    assert sh([str(exe)]).strip().endswith("OK")


def test_pkg_config_file_compiles_the_c_example(tmp_path):
    tool = shutil.which("pkg-config") or shutil.which("pkgconf")
    if tool is None:
        pytest.skip("no pkg-config / pkgconf on this machine")
    env = dict(os.environ, PKG_CONFIG_PATH=pybn.get_pkgconfig_dir())
    assert sh([tool, "--modversion", "pybn"], env=env).strip() == pybn.__version__
    flags = sh([tool, "--cflags", "--libs", "pybn"], env=env).split()
    exe = tmp_path / "train_step"
    sh(["cc", "-std=c99", str(EXAMPLES / "c" / "train_step.c"), *flags, "-lm", "-o", str(exe)])
    assert sh([str(exe)]).strip().endswith("OK")


def test_wheel_holds_one_real_library_file():
    libs = sorted(p.name for p in pathlib.Path(pybn.get_library_dir()).iterdir() if p.name.startswith("libpybn"))
    assert libs == ["libpybn.so"] or libs == ["libpybn.dylib"] or libs == ["pybn.dll"], libs


def test_plain_cmake_install_is_relocatable(tmp_path):
    build, prefix = tmp_path / "lib-build", tmp_path / "prefix"
    sh(["cmake", "-S", str(ROOT), "-B", str(build), "-DPYBN_CUDA=OFF", f"-DCMAKE_INSTALL_PREFIX={prefix}",
        "-DCMAKE_BUILD_TYPE=Release"])
    sh(["cmake", "--build", str(build), "-j2"])
    sh(["cmake", "--install", str(build)])
    moved = tmp_path / "moved"
    shutil.move(str(prefix), str(moved))  # relocatable: nothing points at the old prefix
    cmake_dirs = list(moved.glob("lib*/cmake/pybn"))
    assert len(cmake_dirs) == 1
    assert (moved / "include" / "pybn" / "pybn.h").is_file()
    build_examples(tmp_path, cmake_dirs[0])


def _script(name):
    """A console script of this Python's environment (next to the interpreter, else on PATH)."""
    here = pathlib.Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def test_pybn_config_works_from_the_repository_root(tmp_path):
    """The README's commands as written, run from the repository root: pybn-config (a console
    script: no current folder on sys.path) gives the installed package's flags, and the CMake
    example builds with them; `python -m pybn` there is an immediate, clear error."""
    tool = _script("pybn-config")
    assert tool, "pybn-config is not installed next to the interpreter nor on PATH"
    assert sh([tool, "--cmake-dir"], cwd=ROOT).strip() == pybn.get_cmake_dir()
    flags = sh([tool, "--includes", "--libs"], cwd=ROOT).split()
    exe = tmp_path / "train_step"
    sh(["cc", "-std=c99", str(EXAMPLES / "c" / "train_step.c"), *flags, "-lm", "-o", str(exe)], cwd=ROOT)
    assert sh([str(exe)]).strip().endswith("OK")
    build = tmp_path / "build-examples"
    sh(["cmake", "-S", "examples", "-B", str(build), f"-Dpybn_DIR={sh([tool, '--cmake-dir'], cwd=ROOT).strip()}"],
       cwd=ROOT)
    run = subprocess.run([sys.executable, "-m", "pybn", "--cmake-dir"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "imported from its source folder" in run.stderr and "pybn-config" in run.stderr
    assert "circular import" not in run.stderr


def test_pkgconf_pypi_finds_pybn_without_pkg_config_path(tmp_path):
    """pkgconf-pypi (the pkgconf wheel, in the test extra) finds pybn.pc through the package's
    pkg_config entry point: no PKG_CONFIG_PATH, no warning."""
    tool = _script("pkgconf-pypi")
    if tool is None:
        pytest.skip("pkgconf-pypi is not installed (pip install pkgconf)")
    env = {k: v for k, v in os.environ.items() if k != "PKG_CONFIG_PATH"}
    run = subprocess.run([tool, "--cflags", "--libs", "pybn"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr
    flags = run.stdout.split()
    include = [f[2:] for f in flags if f.startswith("-I")]
    assert [os.path.realpath(d) for d in include] == [os.path.realpath(pybn.get_include())], flags
    exe = tmp_path / "train_step"
    sh(["cc", "-std=c99", str(EXAMPLES / "c" / "train_step.c"), *flags, "-lm", "-o", str(exe)])
    assert sh([str(exe)]).strip().endswith("OK")
