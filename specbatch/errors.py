"""Errors a user can act on: the CLI prints their message on one line, without a traceback."""


class SpecbatchError(Exception):
    """Bad input, configuration or environment, with a message that says what to do."""
