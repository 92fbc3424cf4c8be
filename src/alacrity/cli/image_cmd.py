"""`alacrity image build`."""

from __future__ import annotations

import argparse

from alacrity.cli.errors import UserError
from alacrity.vm.image import ImageError, build_image


def image_build(args: argparse.Namespace) -> int:
    try:
        image = build_image(args.cache, force=args.force, progress=True)
    except ImageError as exc:
        raise UserError(str(exc)) from None
    print(f"kernel {image.kernel}\ninitrd {image.initrd}")
    return 0
