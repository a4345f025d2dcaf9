"""GPU benchmark: xpnet on CuPy vs PyTorch eager and PyTorch with CUDA graphs (also `xpnet bench --device cuda`).

python bench/gpu.py [--device cuda] [--batch-sizes 128,512,4096] [--epochs 5] [--json FILE]
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from xpnet.cli.bench_gpu import run_gpu_benchmark, table  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="128,512,4096")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = run_gpu_benchmark([int(b) for b in args.batch_sizes.split(",")], args.epochs, device=args.device)
    print(table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
