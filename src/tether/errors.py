"""Errors a run raises on purpose, each printed by the CLI as one clean message."""


class NonFiniteError(RuntimeError):
    """A run stopped after ``--max_bad_steps`` consecutive steps with non-finite losses or rewards.

    The message names the file holding the offending batches and the last good checkpoint.
    """
