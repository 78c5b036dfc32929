"""`orca-jax serve` and `orca-jax demo` (the serving issue fills this in)."""


def add_parsers(sub) -> None:
    pass
