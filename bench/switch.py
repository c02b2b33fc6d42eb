"""Switch benchmark (thin script over coeserve.benchmarks.switch; also `coe bench switch`).

    python bench/switch.py --out bench/results/switch-cpu.json                        # CPU, SmolLM2 fp32
    python bench/switch.py --synthetic-shape 7b --out bench/results/switch-h100.json  # GPU, 7B bf16
"""
import sys

from coeserve.benchmarks.switch import main

if __name__ == "__main__":
    sys.exit(main())
