"""The one error type users see: bad input, caught before any heavy work."""


class InvalidRequest(ValueError):
    """A request framecast refuses. The message is one line that says what was wrong and what is allowed.

    The CLI prints it and exits non-zero; the API answers it with a 4xx.
    """
