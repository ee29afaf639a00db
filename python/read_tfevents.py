"""Reads a TensorBoard log folder with TensorBoard's own reader and prints what it holds.

Used by the tests to check the event files `train` writes (trainer/src/tensorboard.rs):
TensorBoard's `EventAccumulator` parses the records (checking their CRCs), the Event and
Summary protocol buffers, and drops what a restart orphaned, as `tensorboard --logdir` does.

    python python/read_tfevents.py RUN_DIR/tensorboard
    -> {"scalars": {tag: [[step, value], ...]}, "images": {tag: [[step, width, height, bytes], ...]}}
"""

import json
import sys

from tensorboard.backend.event_processing import event_accumulator


def main() -> None:
    acc = event_accumulator.EventAccumulator(
        sys.argv[1],
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0},
    )
    acc.Reload()
    tags = acc.Tags()
    out = {
        "scalars": {
            t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]
        },
        "images": {
            t: [[e.step, e.width, e.height, len(e.encoded_image_string)] for e in acc.Images(t)]
            for t in tags["images"]
        },
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
