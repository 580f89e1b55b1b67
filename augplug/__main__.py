"""Command line: ``python -m augplug demo`` (or ``augplug demo``) and ``python -m augplug version``."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: augplug {demo,version} [options]\n\n"
              "  demo     refine a harmful RandAugment + label-noise augmentation on scikit-learn digits\n"
              "  version  print the installed version\n\n"
              "installed with it: augplug-timm-train, augplug-accelerate-train, augplug-albumentations-example\n"
              "(the scripts of augplug.integrations; each takes --help)")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main
        demo_main(rest)
    elif cmd == "version":
        from . import __version__
        print(__version__)
    else:
        raise SystemExit(f"augplug: unknown command {cmd!r} (use 'demo' or 'version')")


if __name__ == "__main__":
    main()
