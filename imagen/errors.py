"""What the user gave us that we cannot use (an error), or will read other than typed (a warning)."""


class ImagenError(Exception):
    """An error caused by user input (a config, an argument, a file), not by a bug.

    Scripts print its message as one paragraph and exit with code 2 instead of
    showing a traceback; the message must name the file, key or argument at fault
    and say what was expected.
    """


class PromptWarning(UserWarning):
    """A prompt the text encoder will not read whole: cut to its length, or with unknown text.
    Scripts print it as one line, without Python's file and line (see ``imagen.cli.run_script``)."""


class ImageRangeWarning(UserWarning):
    """Images given in [-1, 1] with no negative value: most likely [0, 1] images, whose black
    would be read as mid-grey. The script, which converts image files itself, silences it."""
