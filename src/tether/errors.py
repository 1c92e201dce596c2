"""Errors a run raises on purpose, each printed by the CLI as one clean message."""


class NonFiniteError(RuntimeError):
    """A run stopped after ``--max_bad_steps`` consecutive steps with non-finite losses or rewards.

    The message names the file holding the offending batches and the last good checkpoint.
    """


class RewardFunctionFailed(RuntimeError):
    """A ``--reward_funcs`` function raised (or returned a bad value) during a run, which stopped before
    its update; the message names the function, the first failing example and the last checkpoint."""
