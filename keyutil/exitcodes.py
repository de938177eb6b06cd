"""keyutil's exit codes, one table for every command (README: "Exit codes and environment
variables"). A module of its own so that the supervisor (keyutil/enclave/) and the CLI use
the same numbers without importing each other; 130 and 70 are in keyutil.cliutil."""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_DENIED = 4
EXIT_NSM = 5
EXIT_UNAUTHENTICATED = 6
EXIT_OUTPUT = 7
EXIT_NETWORK = 8
EXIT_SEALED = 9  # sealed input refused (keyutil/sealing/commands.py)
EXIT_APP_START = 10  # keyutil run: the app could not be started (workdir, command)
EXIT_EXEC_FAILED = 127  # keyutil exec: the command cannot be executed, as a shell says
