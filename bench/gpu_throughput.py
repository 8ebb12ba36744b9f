"""The node against llama.cpp's own server on one GPU: the same model, every layer on the GPU, 1 and 8 streams.

For a machine with a GPU and llama-cpp-python built for it (docs/operating.md, "GPUs"): this script checks that
llama.cpp sees a GPU, builds llama-server for the same backend once (`bench/build_llama_server.py`, cached), and
runs `bench/node_throughput.py` with `--gpu-layers all` for the node, llama-server and the in-process loops.

    .venv/bin/python bench/gpu_throughput.py --backend cuda --model path/to/model.gguf
    .venv/bin/python bench/gpu_throughput.py --llama-server ~/llama.cpp/build/bin/llama-server --model …

Flags it does not know go to node_throughput.py as they are (`--rounds 5`, `--cold`, `--max-tokens 256` …).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import llama_cpp

HERE = Path(__file__).resolve().parent
# llama.cpp's cmake flag for each GPU backend, as llama-cpp-python's install documents them.
BACKENDS = {"cuda": "-DGGML_CUDA=on", "metal": "-DGGML_METAL=on", "vulkan": "-DGGML_VULKAN=on", "hip": "-DGGML_HIP=on"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="the .gguf file (or catalog name) both serve")
    parser.add_argument("--backend", choices=tuple(BACKENDS), help="build llama-server for this GPU backend")
    parser.add_argument("--llama-server", help="a llama-server built for this GPU, instead of building one")
    parser.add_argument("--threads", default="4", help="CPU threads of each (default 4; the GPU does the work)")
    parser.add_argument("--slots", default="8", help="slots of each (default 8)")
    args, rest = parser.parse_known_args()
    if not llama_cpp.llama_supports_gpu_offload():
        raise SystemExit(
            "gpu_throughput: error: this llama-cpp-python sees no GPU; install a GPU build first, e.g. "
            "CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir llama-cpp-python"
        )
    server = args.llama_server
    if server is None:
        if args.backend is None:
            parser.error("give --backend (to build llama-server for it) or --llama-server PATH")
        build = [sys.executable, str(HERE / "build_llama_server.py"), "--cmake-args", BACKENDS[args.backend]]
        server = subprocess.run(build, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    command = [
        sys.executable, str(HERE / "node_throughput.py"),
        "--model", args.model,
        "--llama-server", server,
        "--gpu-layers", "all",
        "--threads", args.threads,
        "--slots", args.slots,
        "--engines", "batched",
        "--concurrency", "1,8",
        "--whole",
        "--no-llama",
        "--no-bare-batches",
        "--output", str(HERE / "results" / "gpu_throughput.json"),
        *rest,
    ]  # fmt: skip
    print(" ".join(command), file=sys.stderr, flush=True)
    raise SystemExit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
