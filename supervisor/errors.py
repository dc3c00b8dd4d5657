"""The one exception type a user should see: its message is printed as a single line on stderr."""


class TinytownError(Exception):
    """A problem the user can act on (bad config, unknown agent, town not running...)."""
