"""Build llama.cpp's own `llama-server` and `llama-bench` once, from the llama.cpp that the installed
llama-cpp-python vendors, with the node's compile flags, into a cache directory; print the binary's path.

The node's llama-cpp-python is compiled with the flags `make llama-cmake-args` prints (x86-64-v3 rather than
-march=native: see the Makefile), so llama-server is compiled with the same ones: the comparison in
`bench/node_throughput.py --llama-server` is then between the two programs, not between two compilations.

    .venv/bin/python bench/build_llama_server.py                   # prints …/llama.cpp-0.3.36/bin/llama-server
    .venv/bin/python bench/build_llama_server.py --binary llama-bench
    .venv/bin/python bench/build_llama_server.py --cmake-args "-DGGML_CUDA=on"   # a GPU build (its own cache)

The first run downloads llama-cpp-python's sdist with pip (from pip's cache when it holds it) and compiles for
about 6–8 minutes on two cores; every later run with the same version and flags prints the path at once. The
cache is `$LLAMAKIT_CACHE_DIR` or `~/.cache/llamakit` (`$XDG_CACHE_HOME/llamakit`), one directory per
llama-cpp-python version (and per set of extra flags), holding `bin/` (26 MB, static) and `build.json`. Runs at
the same time wait for each other (a lock file). Messages go to stderr; stdout is the path alone, so that
`$(… build_llama_server.py)` works in a shell, in CI and in tests.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("llama-server", "llama-bench")
# What llama-server needs and nothing it would fetch or build besides: no libcurl (models come as files), static
# libraries (the binaries in the cache stand alone), no tests or examples.
BASE_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


def say(message: str) -> None:
    print(f"build_llama_server: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get("LLAMAKIT_CACHE_DIR"):
        return Path(os.environ["LLAMAKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamakit"


def installed_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "build_llama_server: error: llama-cpp-python is not installed here; install the node "
            "(make install, or pip install 'llamakit[node]') or give --version"
        ) from None


def node_cmake_args() -> list[str]:
    """The flags the node's llama-cpp-python is compiled with, from the Makefile (`make llama-cmake-args`)."""
    try:
        done = subprocess.run(
            ["make", "-s", "-C", str(ROOT), "llama-cmake-args"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"build_llama_server: error: `make -s -C {ROOT} llama-cmake-args` failed ({exc}); "
            "give the node's flags with --node-cmake-args"
        ) from None
    return shlex.split(done.stdout)


def cache_dir(version: str, extra: Sequence[str]) -> Path:
    """`llama.cpp-<version>`, with a suffix for extra flags (a CUDA build does not replace the CPU one)."""
    name = f"llama.cpp-{version}"
    if extra:
        name += "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:10]
    return cache_root() / name


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built(directory: Path, recipe: dict[str, object]) -> bool:
    stamp = directory / "build.json"
    if not stamp.exists() or not all((directory / "bin" / name).exists() for name in BINARIES):
        return False
    try:
        return bool(json.loads(stamp.read_text()).get("recipe") == recipe)
    except ValueError:
        return False


def sdist(version: str, given: Path | None, into: Path) -> Path:
    """llama-cpp-python's sdist: the one given, or pip's (from its cache when it holds it)."""
    if given is not None:
        return given
    say(f"fetching the llama-cpp-python {version} sdist with pip (from its cache if there)")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={version}", "-d", str(into),
        ],
        check=True,
        stdout=sys.stderr,
    )  # fmt: skip
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"build_llama_server: error: pip saved no llama_cpp_python sdist in {into}")
    return found[0]


def extract_llama_cpp(archive: Path, source: Path) -> None:
    """Only vendor/llama.cpp of the sdist, into `source`."""
    if source.exists():
        shutil.rmtree(source)
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix) :]
                members.append(member)
        if not members:
            raise SystemExit(f"build_llama_server: error: {archive.name} holds no vendor/llama.cpp")
        tar.extractall(source, members=members, filter="data")


def build(directory: Path, archive: Path | None, version: str, cmake_args: list[str], jobs: int, *, keep: bool) -> None:
    source, build_dir = directory / "src", directory / "build"
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        extract_llama_cpp(sdist(version, archive, Path(tmp)), source)
    say(f"configuring llama.cpp in {build_dir}: cmake {' '.join(cmake_args)}")
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *cmake_args], check=True, stdout=sys.stderr)
    say(f"compiling {' and '.join(BINARIES)} with {jobs} jobs (about 6-8 minutes on two cores)")
    started = time.monotonic()
    subprocess.run(
        ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *BINARIES], check=True, stdout=sys.stderr
    )
    (directory / "bin").mkdir(exist_ok=True)
    for name in BINARIES:
        shutil.copy2(build_dir / "bin" / name, directory / "bin" / name)
    say(f"built in {time.monotonic() - started:.0f} s")
    if not keep:  # the binaries stand alone (static): 26 MB to cache instead of 300
        shutil.rmtree(source)
        shutil.rmtree(build_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--binary", choices=BINARIES, default="llama-server", help="whose path to print")
    parser.add_argument("--version", help="llama-cpp-python version whose llama.cpp to build (default: installed)")
    parser.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (.tar.gz), instead of pip download")
    parser.add_argument(
        "--node-cmake-args", help="the node's compile flags (default: `make -s llama-cmake-args` in the repository)"
    )
    parser.add_argument(
        "--cmake-args", default="", help='extra cmake flags, e.g. "-DGGML_CUDA=on" (a build of its own in the cache)'
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile jobs (default: all CPUs)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if the cache holds a build")
    parser.add_argument("--keep-build", action="store_true", help="keep the sources and build tree (~300 MB)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    version = args.version or installed_version()
    node_args = shlex.split(args.node_cmake_args) if args.node_cmake_args is not None else node_cmake_args()
    extra = shlex.split(args.cmake_args)
    cmake_args = [*BASE_CMAKE_ARGS, *node_args, *extra]
    directory = cache_dir(version, extra)
    recipe: dict[str, object] = {"llama_cpp_python": version, "cmake_args": cmake_args}
    with locked(directory):
        if args.rebuild or not built(directory, recipe):
            build(directory, args.sdist, version, cmake_args, args.jobs, keep=args.keep_build)
            (directory / "build.json").write_text(json.dumps({"recipe": recipe, "built": time.time()}, indent=2))
        else:
            say(f"cached: llama.cpp of llama-cpp-python {version} built with {' '.join(cmake_args)}")
    print(directory / "bin" / args.binary)


if __name__ == "__main__":
    main()
