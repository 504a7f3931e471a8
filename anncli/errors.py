"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a recipe, a path, a shard, a flag); the message is one line."""


EXIT_USAGE = 2
# Exit code of a run that saved a checkpoint on SIGTERM/SIGUSR1 and wants to be requeued.
EXIT_PREEMPTED = 124
