"""The one error type of CT preprocessing: bad user input (file, scan, window), reported in one line."""


class CTInputError(ValueError):
    """A scan or intermediate file cannot be used; the message starts with the file and says why."""
