"""User-facing errors: one clear line, no traceback.

Library code raises :class:`UserError` for bad input (a wrong flag value, a file that
does not match the model, ...). Command-line entry points wrap their ``main`` with
:func:`cli_main`, which prints ``error: <message>`` to stderr and exits with status 2.
Set ``ADJQ_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys


class UserError(ValueError):
    """Bad input: the message names the value and the fix. A ``ValueError``, so library
    users can catch it as one."""

    # Exception's own constructor: AutoGraph then re-raises a UserError raised while tracing
    # a tf.function as a UserError (it rebuilds only such exception types).
    __init__ = Exception.__init__


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (a missing argument, a bad choice) are one
    :class:`UserError` line instead of the usage block and a second line."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def cli_main(main):
    """Decorate a CLI ``main``: turn :class:`UserError` into one line and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("ADJQ_TRACEBACK"):
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            from adj_quant.files import is_disk_full  # noqa: PLC0415

            if os.environ.get("ADJQ_TRACEBACK") or not is_disk_full(err):
                raise
            where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
            print(f"error: no space left on device{where}; free some space and rerun",
                  file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
