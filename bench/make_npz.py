"""Write a MedMNIST-layout .npz for trying the npz path without a download.

    python -m bench.make_npz --out digits28.npz [--binary] [--size 28]

The images are scikit-learn's digits, upscaled to --size (uint8, (N, H, W)); labels are the
digit, or with --binary "digit >= 5" (a two-class task, so AUC is reported).
Keys: train_images, train_labels, val_images, val_labels, test_images, test_labels.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.data import load_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .npz file to write (must not exist)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--binary", action="store_true", help="two classes: digit >= 5")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} already exists: choose another --out", file=sys.stderr)
        return 2
    digits = load_dataset("digits")
    images = np.stack([
        np.asarray(Image.fromarray((x[:, :, 0] * 255).astype(np.uint8)).resize((args.size, args.size), Image.BILINEAR))
        for x in digits.train_x
    ])
    labels = (digits.train_y >= 5).astype(np.int64) if args.binary else digits.train_y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order][:, None]  # MedMNIST stores labels as (N, 1)
    test, val = len(labels) // 5, len(labels) // 10
    np.savez_compressed(out, test_images=images[:test], test_labels=labels[:test],
                        val_images=images[test:test + val], val_labels=labels[test:test + val],
                        train_images=images[test + val:], train_labels=labels[test + val:])
    print(f"wrote {out}: {len(labels) - test - val} train, {val} val, {test} test images of {args.size}x{args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
