"""The one error type of the data path."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""
