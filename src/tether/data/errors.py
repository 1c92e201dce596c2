"""The error every data problem becomes: a list of ``FILE:LINE: what is wrong`` lines."""

from __future__ import annotations

MAX_REPORTED_PROBLEMS = 20


class DataError(ValueError):
    """Bad input data. ``problems`` holds one ``FILE:LINE: message`` string per problem found."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = list(problems)
        self.total = total if total is not None else len(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = self.total - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problem(s)" if more > 0 else "")
        super().__init__(text)
