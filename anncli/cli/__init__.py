"""The command line: the Typer app (`main.py`) and one module per verb group (`data`, `weights`, `tools`, `recipes`),
with the options they share (`options.py`) and the one-line error handling (`common.py`). A command parses
its options, loads the recipe and calls one function of a lower wing; it holds no logic of its own.
Imports: any wing below. Nothing imports `cli` (only `python -m anncli`). `ann --help` imports no torch:
every command imports its wing inside the command.
"""


def __getattr__(name: str):
    # `anncli.cli:app` is the console script's entry point; the app is built on first use only, so that
    # importing one verb module does not import them all.
    if name == "app":
        from anncli.cli.main import app

        return app
    raise AttributeError(f"module 'anncli.cli' has no attribute {name!r}")
