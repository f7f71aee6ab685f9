"""Error types. ``AxcnnError`` marks a user error: the CLI prints its message on one line and exits 1."""


class AxcnnError(Exception):
    """A problem with the user's input (model, data, options) rather than a bug in axcnn."""


class MissingBackendError(AxcnnError):
    """An optional backend is not installed; the message names the extra to install."""

    def __init__(self, backend: str, extra: str):
        super().__init__(f"{backend} is not installed; install it with: pip install 'axcnn[{extra}]'")
        self.backend = backend
        self.extra = extra


class BudgetNotMet(AxcnnError):
    """Budget mode found no network within the budget (on the selection or the verification samples)."""
