"""The one error type of the data package: each message names the file or URL and the problem."""


class DataError(ValueError):
    """A dataset that cannot be read, found or downloaded."""
