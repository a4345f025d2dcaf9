"""CPU benchmark: xpnet vs PyTorch eager vs scikit-learn vs the matmul floor (also `xpnet bench`).

python bench/cpu.py [--batch-sizes 32,128,512] [--epochs 5] [--no-rss] [--json FILE]
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from xpnet.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
