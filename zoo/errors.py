"""The one exception type the command line turns into a one-line message."""


class UserInputError(ValueError):
    """Bad input from the user: a file, a folder or an option.

    The message names the file or option, what was expected and what came, and the
    fix. The CLI prints it as one line, without a traceback.
    """


class HubUnreachable(UserInputError):
    """Pretrained weights could not be downloaded from the Hugging Face hub (offline, firewalled)."""
