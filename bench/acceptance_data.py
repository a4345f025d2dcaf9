"""The data issue's acceptance runs, printed as tables (accuracy varies with the seed: several).

    python bench/acceptance_data.py [--seeds 0,1,2,3,4] [--device cpu]

1. MNIST, 784-128-64-10 ReLU MLP, Adam lr 1e-3, batch 128, 5 epochs: test accuracy per seed.
2. Breast cancer, 30-16-8-1 ReLU MLP, dropout 0.2, BCE on the logit, Adam lr 1e-3, batch 32,
   standardized on the training split only, 341/114/114 split, early stopping on the validation
   loss (patience 20, best weights restored): test accuracy per seed.
3. Loading all of MNIST from the embedded files: seconds and peak RSS growth (in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import xpnet as xn
from xpnet.data import load_dataset

LOAD_PROBE = """
import json, resource, time
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import numpy, xpnet.data
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ds = xpnet.data.load_dataset("mnist")
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "growth_mib": (peak - baseline) / 1024,
                  "arrays_mib": (ds.train.x.nbytes + ds.test.x.nbytes) / 2**20}))
"""


def mnist(seed: int, device: str) -> float:
    ds = load_dataset("mnist")
    model = xn.mlp(784, [128, 64], 10, device=device, seed=seed)
    xn.fit(model, "cross_entropy", xn.Adam(1e-3), ds.train.x, ds.train.y, epochs=5, batch_size=128)
    return xn.evaluate(model, "cross_entropy", ds.test.x, ds.test.y)["accuracy"]


def wdbc(seed: int, device: str) -> float:
    ds = load_dataset("wdbc").standardized()
    model = xn.mlp(30, [16, 8], 1, dropout=0.2, device=device, seed=seed)
    xn.fit(
        model,
        "bce",
        xn.Adam(1e-3),
        ds.train.x,
        ds.train.y,
        epochs=300,
        batch_size=32,
        validation_data=(ds.val.x, ds.val.y),
        callbacks=[xn.EarlyStopping(20)],
    )
    return xn.evaluate(model, "bce", ds.test.x, ds.test.y)["binary_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    load = json.loads(
        subprocess.run([sys.executable, "-c", LOAD_PROBE], capture_output=True, text=True, check=True).stdout
    )
    print(
        f"MNIST load: {load['seconds']:.2f} s, peak RSS {load['peak_mib']:.0f} MiB "
        f"(+{load['growth_mib']:.0f} MiB for {load['arrays_mib']:.0f} MiB of float32 arrays)"
    )
    for name, run, target in (("mnist", mnist, 0.975), ("wdbc", wdbc, 0.96)):
        rows = []
        for seed in seeds:
            started = time.perf_counter()
            accuracy = run(seed, args.device)
            rows.append(accuracy)
            print(
                f"{name:6s} seed {seed}: test accuracy {accuracy:.4f}  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        met = sum(a >= target for a in rows)
        print(
            f"{name:6s} mean {statistics.mean(rows):.4f}, min {min(rows):.4f}, max {max(rows):.4f}; "
            f"{met}/{len(rows)} seeds >= {target}"
        )


if __name__ == "__main__":
    main()
