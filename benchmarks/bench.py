"""The benchmark against the peers, as a script: ``python benchmarks/bench.py [OPTIONS]`` is ``trivit bench
[OPTIONS]`` (see trivit/bench.py and docs/benchmarks.md for what it measures and how to read it).

    python benchmarks/bench.py --json bench.json --png bench.png     # everything (tens of minutes on a CPU)
    python benchmarks/bench.py --quick                               # ViT-S/16, a subset
    python benchmarks/bench.py --frameworks pt --only inference,train
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trivit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
