"""Reads a strata run's TensorBoard event files with TensorBoard's own reader and prints every
scalar series as JSON: {tag: [[step, value], ...]}. tests/train_e2e.rs compares it with the
run's metrics.jsonl.

    python3 scripts/tensorboard_check.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
