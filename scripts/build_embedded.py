"""Build the small CIFAR-10 subset that ships inside the package.

The embedded subset lets examples, tests and smoke runs work with no download.
It keeps the ORIGINAL JPEG bytes from the source tarball (no re-encoding, so no
extra quality loss) and stores them concatenated with an offsets array, which
is both compact and fast to decode in one batched call.

Usage (from the repository root):
    python scripts/build_embedded.py [--src ../shared/data/cifar10-jpg.tar.gz]
                                     [--out src/selfsup/data/embedded/cifar10_subset.npz]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_OUT = REPO_ROOT / "src" / "selfsup" / "data" / "embedded" / "cifar10_subset.npz"
PER_CLASS = {"train": 500, "test": 100}
DEFAULT_SEED = 0


def parse_member_name(name: str) -> tuple[str, str] | None:
    """Return (split, class) for a `split/class/file.jpg` member, or None for anything else.

    Directory entries and stray files are ignored so the script tolerates
    tarballs with or without explicit directory members.
    """
    parts = Path(name).parts
    if len(parts) != 3 or parts[0] not in PER_CLASS:
        return None
    if not parts[2].lower().endswith((".jpg", ".jpeg")):
        return None
    return parts[0], parts[1]


def list_members(src: Path) -> dict[str, dict[str, list[str]]]:
    """First streaming pass: collect member names grouped by split and class.

    Only names are kept, so memory stays tiny; the bytes are read in a second pass.
    """
    grouped: dict[str, dict[str, list[str]]] = {split: defaultdict(list) for split in PER_CLASS}
    with tarfile.open(src, mode="r|gz") as archive:
        for member in archive:
            if not member.isfile():
                continue
            parsed = parse_member_name(member.name)
            if parsed is not None:
                split, cls = parsed
                grouped[split][cls].append(member.name)
    return grouped


def choose_subset(
    grouped: dict[str, dict[str, list[str]]], seed: int
) -> tuple[list[str], dict[str, list[str]]]:
    """Pick a balanced, deterministic subset: fixed seed applied to sorted names.

    Sorting first makes the choice independent of the order inside the tarball.
    Returns the sorted class names and, per split, the chosen member names
    ordered by (class, file name).
    """
    classes = sorted(set(grouped["train"]) | set(grouped["test"]))
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    for split, per_class in PER_CLASS.items():
        names: list[str] = []
        for cls in classes:
            available = sorted(grouped[split].get(cls, []))
            if len(available) < per_class:
                raise SystemExit(
                    f"error: {split}/{cls} has {len(available)} images, need at least {per_class}"
                )
            picks = rng.choice(len(available), size=per_class, replace=False)
            names.extend(available[i] for i in sorted(picks.tolist()))
        chosen[split] = names
    return classes, chosen


def read_chosen_bytes(src: Path, wanted: set[str]) -> dict[str, bytes]:
    """Second streaming pass: read the raw bytes of the chosen members only."""
    found: dict[str, bytes] = {}
    with tarfile.open(src, mode="r|gz") as archive:
        for member in archive:
            if member.isfile() and member.name in wanted:
                handle = archive.extractfile(member)
                if handle is None:
                    raise SystemExit(f"error: cannot read {member.name} from {src}")
                found[member.name] = handle.read()
    missing = wanted - set(found)
    if missing:
        raise SystemExit(f"error: {len(missing)} chosen members were not readable, e.g. {sorted(missing)[0]}")
    return found


def pack_split(
    names: list[str], blobs: dict[str, bytes], classes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate JPEG bytes and build the (N+1) offsets and the labels of one split."""
    class_index = {cls: i for i, cls in enumerate(classes)}
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    labels = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        offsets[i + 1] = offsets[i] + len(blobs[name])
        labels[i] = class_index[Path(name).parts[1]]
    data = np.frombuffer(b"".join(blobs[name] for name in names), dtype=np.uint8)
    return data, offsets, labels


def build(src: Path, out: Path, seed: int) -> None:
    """Read the tarball, choose the subset and write the npz file."""
    if not src.is_file():
        raise SystemExit(f"error: source tarball not found: {src} (pass --src)")
    grouped = list_members(src)
    classes, chosen = choose_subset(grouped, seed)
    blobs = read_chosen_bytes(src, {name for names in chosen.values() for name in names})
    arrays: dict[str, np.ndarray] = {}
    for split, names in chosen.items():
        data, offsets, labels = pack_split(names, blobs, classes)
        arrays[f"{split}_bytes"] = data
        arrays[f"{split}_offsets"] = offsets
        arrays[f"{split}_labels"] = labels
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as handle:  # a file handle stops np.savez from appending ".npz"
        np.savez(
            handle,
            **arrays,
            classes=np.array(classes),
            source=np.array(src.name),
            seed=np.array(seed, dtype=np.int64),
        )
    for split, names in chosen.items():
        print(f"{split}: {len(names)} images ({PER_CLASS[split]} per class x {len(classes)} classes)")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="cifar10-jpg.tar.gz to read")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the subset choice")
    args = parser.parse_args(argv)
    build(args.src, args.out, args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
