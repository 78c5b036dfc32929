"""`orca-jax`: the command line (convert, generate, bench, serve, demo, plan).

    app.py    the parser and `main`; convert and offline generate
    flags.py  flags shared by the commands (engine flags derived from EngineConfig), and
              building an engine from them
    serve.py  serve, demo, generate --server (the network commands)
    plan.py   plan (per-device memory and step-time estimates)

The `bench` command's parser lives with the benchmark (orca_jax/bench/run.py, stages.py).
"""


def main(argv: list[str] | None = None) -> int:
    """The console script `orca-jax` (and `python -m orca_jax.cli`)."""
    from .app import main as run
    return run(argv)
