"""Exception types shared across hpcdl."""


class ConfigError(ValueError):
    """Invalid user input: a config value, a spec string, a file or a flag.

    The message names the offending value and how to fix it. The CLI turns
    it into a one-paragraph error with exit status 2 before any rank starts.
    """


class RankFailure(RuntimeError):
    """A rank failed during a distributed job."""
