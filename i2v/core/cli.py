"""Entry-point wrapper: user mistakes print one clear line (with the rank) instead of a traceback."""

from __future__ import annotations

import os
import sys

from i2v.core.errors import I2VError


def _clean(message: str) -> str:
    # Errors re-raised from DataLoader workers carry the worker's traceback; keep the message.
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def run(main) -> None:
    try:
        code = main()
    except I2VError as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {_clean(str(e))}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
