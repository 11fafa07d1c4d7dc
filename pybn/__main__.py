"""python -m pybn --includes | --libs | --cmake-dir | --pkgconfig-dir | --version

Prints what a build system needs to use libpybn from C or C++ (like pybind11 and numpy do).
"""
import argparse
import sys

import pybn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pybn", description=__doc__.splitlines()[2])
    ap.add_argument("--includes", action="store_true", help="compiler flags: -I<include dir>")
    ap.add_argument("--libs", action="store_true", help="linker flags: -L<dir> -Wl,-rpath,<dir> -lpybn")
    ap.add_argument("--cmake-dir", action="store_true", help="the CMake package folder (pybn_DIR)")
    ap.add_argument("--pkgconfig-dir", action="store_true", help="the folder of pybn.pc")
    ap.add_argument("--version", action="store_true", help="the library version")
    args = ap.parse_args(argv)
    out = []
    if args.includes:
        out.append(f"-I{pybn.get_include()}")
    if args.libs:
        d = pybn.get_library_dir()
        out.append(f"-L{d} -Wl,-rpath,{d} -lpybn")
    if args.cmake_dir:
        out.append(pybn.get_cmake_dir())
    if args.pkgconfig_dir:
        out.append(pybn.get_pkgconfig_dir())
    if args.version:
        out.append(pybn.__version__)
    if not out:
        ap.print_help()
        return 1
    print(" ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
