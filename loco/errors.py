"""The one exception type users see: a one-line message naming the problem and the fix.

The CLI catches :class:`LocoError` and prints ``error: <message>`` without a traceback;
anything else is a bug and keeps its traceback.
"""


class LocoError(Exception):
    """Bad input (config, data, checkpoint, split) that the user can fix."""
