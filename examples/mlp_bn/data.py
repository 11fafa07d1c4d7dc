"""Data for the MLP batch-normalisation demo.

Two data sets, both returned as NumPy arrays ``(x_train, y_train, x_test, y_test)``:

* ``load_digits_split`` - scikit-learn's bundled 8x8 handwritten digits (1797 images, 64
  features, 10 classes; shipped inside scikit-learn, no download), split 80/20 with a fixed seed
  and scaled to [0, 1].
* ``load_cifar10`` - CIFAR-10 in its "python version" format (``cifar-10-python.tar.gz`` from
  https://www.cs.toronto.edu/~kriz/cifar.html, or the extracted ``cifar-10-batches-py`` folder):
  50000 training and 10000 test images of 32x32x3 = 3072 uint8 values, 10 classes.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from typing import Dict, Tuple

import numpy as np

Split = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_FOLDER = "cifar-10-batches-py"  # the folder inside the official archive


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's digits, shuffled with `seed` and split into train/test.

    Features are pixel intensities 0..16, divided by 16 so that they lie in [0, 1] (float32);
    labels are int64 class numbers 0..9.
    """
    from sklearn.datasets import load_digits  # imported here: only this data set needs it

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _unpickle_batch(raw: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file: a pickled dict with b"data" (N x 3072 uint8) and b"labels".

    Note: unpickling runs code chosen by whoever wrote the file; only load archives you trust
    (the official one is fine).
    """
    try:
        batch = pickle.loads(raw, encoding="bytes")  # the files were written by Python 2
    except Exception as e:
        raise ValueError(f"CIFAR-10 file {name!r} is not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"CIFAR-10 file {name!r} should hold a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 file {name!r}: expected data of shape (N, 3072) and N labels, got data "
                         f"{data.shape} and labels {labels.shape}")
    return data, labels


def _read_cifar10_files(path: str) -> Dict[str, bytes]:
    """The raw bytes of the six batch files, from a .tar.gz archive or a folder."""
    wanted = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    found: Dict[str, bytes] = {}
    if os.path.isdir(path):
        folder = path
        if not os.path.exists(os.path.join(folder, wanted[0])) and os.path.isdir(os.path.join(path, CIFAR10_FOLDER)):
            folder = os.path.join(path, CIFAR10_FOLDER)  # the folder the archive was extracted into
        for name in wanted:
            file = os.path.join(folder, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    found[name] = f.read()
        where = f"folder {folder!r}"
    elif os.path.isfile(path):
        try:
            archive = tarfile.open(path, "r:*")  # read in memory, nothing extracted to disk
        except tarfile.TarError as e:
            raise ValueError(f"{path!r} is not a tar archive ({e}); pass cifar-10-python.tar.gz or the extracted "
                             f"{CIFAR10_FOLDER} folder") from None
        with archive:
            for member in archive.getmembers():
                name = os.path.basename(member.name)
                if member.isfile() and name in wanted and name not in found:
                    found[name] = archive.extractfile(member).read()
        where = f"archive {path!r}"
    else:
        raise FileNotFoundError(f"CIFAR-10 path {path!r} does not exist; pass cifar-10-python.tar.gz (the "
                                f"'CIFAR-10 python version' download) or its extracted {CIFAR10_FOLDER} folder")
    missing = [name for name in wanted if name not in found]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {where} lacks {', '.join(missing)} (expected {', '.join(wanted)}: the "
                                f"'CIFAR-10 python version' format)")
    return found


def load_cifar10(path: str) -> Split:
    """CIFAR-10 from `path`: the downloaded ``cifar-10-python.tar.gz`` or the extracted
    ``cifar-10-batches-py`` folder (or the folder holding it).

    Returns uint8 images of shape (N, 3072) (the 1024 red, then green, then blue values of a
    32x32 image) and int64 labels 0..9: (x_train, y_train, x_test, y_test) with 50000 and 10000
    images for the real data set. Raises FileNotFoundError for a wrong path or missing batch files
    and ValueError for files in another format.
    """
    files = _read_cifar10_files(os.fspath(path))
    train = [_unpickle_batch(files[name], name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _unpickle_batch(files[CIFAR10_TEST_FILE], CIFAR10_TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test

