"""Fetch torchvision's ImageNet ResNet weights for ``model.backbone_weights`` (on a machine with internet).

    python -m hvd_megdet.tools.fetch_weights                      # ResNet-50 into data/pretrained/
    python -m hvd_megdet.tools.fetch_weights --arch all --out /shared/pretrained
    python -m hvd_megdet.tools.fetch_weights --url https://mirror.example.org/models/resnet50-0676ba61.pth

Compute nodes usually have no internet, and the Table 3 configs expect
``data/pretrained/resnet50-0676ba61.pth``: run this on a login node (or anywhere, then copy the
directory). Files keep torchvision's names (the IMAGENET1K_V1 weights, the ones the FPN papers
start from); each name carries the first hex digits of the file's SHA-256, which is checked, as
``torch.hub`` does. A file is written only once it has arrived whole and its hash matches, so a
failed or corrupted download leaves nothing behind (and an existing good file is kept). ``--url``
fetches from a mirror, or a ``file://`` URL; its name must carry the hash prefix too.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torchvision

from hvd_megdet.errors import UserError
from hvd_megdet.fileio import atomic_path

DEFAULT_OUT = "data/pretrained"
# torchvision's URLs, from torchvision itself: resnet50 -> .../resnet50-0676ba61.pth (as the configs name it).
WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url,
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torch.hub's HASH_REGEX, with a minimum length


class HashMismatch(UserError):
    """The fetched bytes are not the file the name promises."""


class DownloadError(UserError):
    """The URL could not be read (no network, not found, timed out)."""


def hash_prefix(name: str) -> str:
    """The SHA-256 prefix a torchvision weight file name carries (``resnet50-0676ba61.pth`` -> 0676ba61)."""
    match = _HASH_IN_NAME.search(name)
    if not match:
        raise ValueError(f"{name}: no SHA-256 prefix in the name (expected NAME-<hex digits>.pth)")
    return match.group(1)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, out_dir: str | Path, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``out_dir`` under its own name, checking the hash prefix in that name.

    A URL may also be a local path. An existing file whose hash matches is kept as it is.

    Returns:
        The file's path.

    Raises:
        HashMismatch: the bytes do not match the name's hash (nothing is written or replaced).
        DownloadError: the download failed (the message names the URL; nothing is written).
        WriteError: ``out_dir`` could not take the file (full, read-only).
    """
    name = Path(urllib.parse.urlparse(url).path).name
    expected = hash_prefix(name)
    target = Path(out_dir) / name
    if target.is_file() and sha256_of(target).startswith(expected):
        print(f"{target}: present, SHA-256 starts with {expected}: kept")
        return target
    source = url if urllib.parse.urlparse(url).scheme else Path(url).resolve().as_uri()
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0)
                show = total > 0 and sys.stderr.isatty()  # a counter redrawn in place: terminals only
                done = 0
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
                    done += len(block)
                    if show:
                        print(f"\r{name}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB", end="", file=sys.stderr)
                if show:
                    print(file=sys.stderr)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise DownloadError(f"{url}: download failed ({getattr(err, 'reason', err)}); this needs a machine "
                          f"with internet (a login node), or --url of a reachable mirror") from None
        if not digest.hexdigest().startswith(expected):
            raise HashMismatch(f"{url}: SHA-256 {digest.hexdigest()[:16]}... does not start with {expected} "
                               f"(as the name promises): corrupted or not the published file; nothing written")
    print(f"{target}: SHA-256 {digest.hexdigest()[:16]}... matches")
    return target


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for the files (default {DEFAULT_OUT})")
    parser.add_argument("--arch", nargs="+", default=["resnet50"], choices=[*WEIGHTS, "all"],
                        help="which ResNets (default resnet50, the Table 3 backbone)")
    parser.add_argument("--url", nargs="+", default=None,
                        help="fetch these URLs (or local files) instead: a mirror; names must carry the hash")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    urls = args.url or [WEIGHTS[a] for a in (WEIGHTS if "all" in args.arch else dict.fromkeys(args.arch))]
    failed = 0
    for url in urls:
        try:
            path = fetch(url, args.out)
        except (OSError, ValueError, UserError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"  in a config:  model.backbone_weights: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
