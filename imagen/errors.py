"""The one exception type that means "the user gave us something we cannot use"."""


class ImagenError(Exception):
    """An error caused by user input (a config, an argument, a file), not by a bug.

    Scripts print its message as one paragraph and exit with code 2 instead of
    showing a traceback; the message must name the file, key or argument at fault
    and say what was expected.
    """
